"""What a run writes as it goes: ``metrics.jsonl``, TensorBoard events, a progress bar.

Only the process that owns the log (process 0) writes. On resume, lines past the restored step
(written after the last checkpoint by a run that was then killed) are dropped, so the file reads
as if the run had never stopped.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Mapping

import tqdm
from tensorboardX import SummaryWriter

from surm import workdir as workdir_files


class RunLog:
    def __init__(self, workdir: pathlib.Path, *, enabled: bool, resume_step: int,
                 total_steps: int):
        self.enabled = enabled
        self.path = workdir / workdir_files.METRICS
        if not enabled:
            return
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(str(workdir / workdir_files.TENSORBOARD))
        self.bar = tqdm.tqdm(total=total_steps, initial=resume_step, file=sys.stderr,
                             dynamic_ncols=True, mininterval=2.0, desc="train")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])
        shown = {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}
        if shown:
            self.bar.write(f"step {record['step']}: " +
                           ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def progress(self, step: int, loss: float) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.file.close()
