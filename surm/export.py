"""Export a finished run: ``python -m surm.export --workdir DIR --out PATH``.

lora mode with a structured family: the merged model (``scale * to_dense(S)`` folded into the
kernels, zero inference overhead) in the base checkpoint's own format, a Hugging Face folder
(``model.safetensors`` + ``config.json`` + tokenizer) for BERT, a google ``.npz`` for ViT,
written to PATH/merged; and always the adapter-only files (``adapters.safetensors`` +
``peft_spec.json``) in PATH/adapters. Adapter mode, Houlsby adapters and BitFit/probe runs have no
mergeable update: their adapters (and trained base leaves) are exported alone.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import ml_collections
from absl import app, flags

from surm import data, peft
from surm.models import bert, factory, vit
from surm.peft import io as peft_io

def export(workdir: str | pathlib.Path, out: str | pathlib.Path) -> dict[str, str]:
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    config_file, adapters = workdir / "config.json", workdir / "adapters"
    if not config_file.is_file() or not (adapters / peft_io.WEIGHTS).is_file():
        raise FileNotFoundError(f"{workdir} holds no finished run ({config_file.name} and "
                                f"adapters/{peft_io.WEIGHTS} are written by surm.train at the end)")
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    num_classes = data.get_spec(config.input.dataset).num_classes
    model, params, _ = factory.build(config.model, num_classes)
    trainable, spec = peft_io.load(adapters, params)
    written = {}
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export into a new folder")
    shutil.copytree(adapters, out / "adapters")
    written["adapters"] = str(out / "adapters")
    if spec.mergeable:
        _, frozen = peft.split(params, spec)
        merged = jax.device_get(peft.merge(peft.full_params(frozen, trainable),
                                           trainable["adapters"], spec))
        if config.model.name == "bert":
            bert.save(out / "merged", model.config, merged,
                      source=factory.tokenizer_folder(config.model))
            written["merged"] = str(out / "merged")
        else:
            (out / "merged").mkdir(parents=True)
            vit.save(out / "merged" / "model.npz", merged)
            written["merged"] = str(out / "merged" / "model.npz")
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    written = export(flags.FLAGS.workdir, flags.FLAGS.out)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if "merged" not in written:
        print("no merged model: this run's update is not a fixed matrix (adapter mode, Houlsby, "
              "BitFit or a linear probe); load the adapters with surm.peft.io.load")


if __name__ == "__main__":
    # Defined here, not at import, so that importing this module next to surm.train is fine.
    flags.DEFINE_string("workdir", None, "The run's --workdir.")
    flags.DEFINE_string("out", None, "Output folder (new or empty).")
    app.run(main)
