"""Show what a config fine-tunes: ``python -m surm.inspect --config configs/x.py[:args] [--json]``.

Builds the model and the PEFT spec exactly as the trainer does, injects the adapters and prints
the targeted paths with per-module and total trainable counts, the base size and the share. With
``--json`` the last line is one JSON object (trainable, base, adapter, targets, per_module, ...).
"""
from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from surm import cli, data, peft
from surm.models import factory

def describe(config) -> dict:
    """The counts dict of ``surm.peft.count`` for a config (no data is read)."""
    num_classes = data.get_spec(config.input.dataset).num_classes
    _, params, _ = factory.build(config.model, num_classes)
    spec = peft.config_to_spec(config.peft)
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(config.seed))
    return peft.count(params, trainable, spec)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    counts = describe(flags.FLAGS.config)
    print(peft.format_report(counts))
    if flags.FLAGS.json:
        print(json.dumps(counts))


def run() -> None:
    """The command line (``python -m surm.inspect``, ``surm-inspect``)."""
    # Defined here, not at import, so that importing describe() next to surm.train is fine.
    config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:args]).",
                                    lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
