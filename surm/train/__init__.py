"""Fine-tune with SURM: ``python -m surm.train --config configs/<file>.py[:k=v,...] --workdir DIR``.

The trainer, in four modules: ``checks`` (everything refused before a write),
``step`` (the jitted train and eval steps), ``loop`` (``train_and_evaluate``, top to bottom)
and ``__main__`` (the flags). Whatever is specific to a task is the task's (``surm.tasks``):
the trainer asks, never branches.

Resumes from DIR when it holds a checkpoint: the latest, or
``--config.restore_step=N`` (a kept step; the checkpoints after it are deleted and written
again by the resumed run). Writes ``DIR/metrics.jsonl`` (one JSON object per line, each with
``step``), ``DIR/predictions/<role>_<step>.npz`` (what the model predicted for each example at
each evaluation, from which the logged metrics are computed: ``surm.predictions``),
``DIR/config.json``, TensorBoard events in ``DIR/tb``, checkpoints in
``DIR/checkpoints``, the final adapters in ``DIR/adapters``, ``DIR/summary.json`` and
``DIR/outputs.json`` (what the model's outputs are: the number of classes and their names, read
by ``surm.runs`` and ``surm.export``).

Multi-host: see ``surm.train.__main__``.
"""
from surm.tasks import preprocessors
from surm.train.checks import ConfigError, check_config, check_workdir, resume_changes
from surm.train.loop import train_and_evaluate
from surm.train.step import initial_state, make_step_fns

__all__ = ["ConfigError", "check_config", "check_workdir", "initial_state", "make_step_fns",
           "preprocessors", "resume_changes", "train_and_evaluate"]
