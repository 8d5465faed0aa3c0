"""Export a finished run: ``python -m surm.export --workdir DIR --out PATH``.

Needs only the workdir (and the base checkpoint the run started from), never the data: what the
outputs are comes from the run's record (``outputs.json``, see `surm.runs`).

lora mode with a structured family: the merged model (``scale * to_dense(S)`` folded into the
kernels, zero inference overhead) in PATH/merged, in the model's own format (its registry
entry's ``save``, `surm.models.registry`; a registered model without one has no merged export,
and the export says so before writing anything):

* BERT: a folder that transformers or sentence-transformers run as it is, in the layout the
  run's pooling calls for (`surm.models.bert.save`): pooling='pooler' is a transformers
  ``BertForSequenceClassification``; 'mean' and 'cls' are a sentence-transformers pipeline
  (encoder, a pooling module that names the pooling, the classifier as a linear ``2_Dense``).
* ViT: a google-format ``model.npz`` recording its architecture (layer scale, GELU form, ...),
  so ``model.checkpoint=PATH/merged/model.npz`` builds the same model.

and ``labels.json`` beside it (the class names in output order, where the data named them).
Always: the adapter-only files (``adapters.safetensors``, ``peft_spec.json`` and ``base.json``,
the base they load on: `surm.peft.io`) in PATH/adapters, and the run's ``config.json`` and
``outputs.json``. Adapter mode, Houlsby adapters and BitFit/probe runs have no mergeable update:
their adapters (and trained base leaves) are exported alone.

PATH is written whole or not at all: into a temporary folder beside it, renamed at the end.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import numpy as np
from absl import app, flags

from surm import cli, peft, runs
from surm import workdir as workdir_files
from surm.workdir import staged_folder


def _check_out(out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; export into a new one")


def export(workdir: str | pathlib.Path, out: str | pathlib.Path) -> dict[str, str]:
    """Writes the run in `workdir` to `out` (see the module docstring); returns what was
    written (kind -> path). Raises FileNotFoundError, FileExistsError or ValueError, each with
    a one-line message, before anything is written."""
    workdir, out = workdir_files.local(workdir), workdir_files.local(out)
    _check_out(out)
    run = runs.load_run(workdir)
    bad = [name for name, leaf in peft.tree.flatten(run.trainable).items()
           if not np.all(np.isfinite(np.asarray(leaf)))]
    if bad:
        raise ValueError(f"{workdir / 'adapters'} holds NaN/Inf in {len(bad)} tensor(s) (e.g. "
                         f"{bad[0]}): merging them would break the model; export a run that "
                         f"trained without diverging")
    merged = None
    if run.spec.mergeable:
        if run.entry.save is None:
            raise ValueError(f"model.name={run.config.model.name!r} has no save(): its merged "
                             f"weights have no format to be written in (its adapters are in "
                             f"{workdir / 'adapters'}, for surm.peft.io.load)")
        _, frozen = peft.split(run.base, run.spec)
        merged = jax.device_get(peft.merge(peft.full_params(frozen, run.trainable),
                                           run.trainable["adapters"], run.spec))
    with staged_folder(out) as staging:
        saved = _write(run, merged, staging)
        _check_out(out)
    written = {"adapters": str(out / "adapters")}
    if saved is not None:
        written["merged"] = str(out / saved)
    return written


def _write(run: runs.Run, merged: dict | None, folder: pathlib.Path) -> pathlib.Path | None:
    """Writes the export into ``folder``; returns where the merged model is, relative to it
    (what ``model.checkpoint`` takes), or None without one."""
    shutil.copytree(run.workdir / workdir_files.ADAPTERS, folder / workdir_files.ADAPTERS)
    shutil.copyfile(run.workdir / workdir_files.CONFIG, folder / workdir_files.CONFIG)
    (folder / runs.RECORD).write_text(json.dumps(run.record, indent=2, ensure_ascii=False))
    if merged is None:
        return None
    target = folder / "merged"
    target.mkdir()
    saved = pathlib.Path(run.entry.save(target, run, merged))
    (target / "labels.json").write_text(json.dumps(
        {"labels": run.labels, "num_classes": run.num_classes,
         "regression": run.record["regression"]}, indent=2, ensure_ascii=False))
    return saved.relative_to(folder)


def run_cli(workdir: str, out: str) -> int:
    """The command: prints what was written, or one ``error:`` line; the exit status."""
    try:
        written = export(workdir, out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines)}", file=sys.stderr)
        return 1
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if "merged" not in written:
        print("no merged model: this run's update is not a fixed matrix (adapter mode, Houlsby, "
              "BitFit or a linear probe); load the adapters with surm.peft.io.load")
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    sys.exit(run_cli(flags.FLAGS.workdir, flags.FLAGS.out))


def cli_main() -> None:
    """The command line (``python -m surm.export``)."""
    # Defined here, not at import, so that importing this module next to surm.train is fine.
    flags.DEFINE_string("workdir", None, "The run's --workdir.")
    flags.DEFINE_string("out", None, "Output folder (new or empty).")
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    cli_main()
