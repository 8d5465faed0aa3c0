"""The model registry: the built-in entries, lookup errors, registration checks, and a model
brought by its config file, trained by ``python -m surm.train``, loaded back and exported."""
import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from surm import models, peft, runs
from surm.interop import export
from surm.models import bert, bert_io, factory, registry, vit
from test_data_local import make_image_folder
from test_export import fabricate_run
from test_train import ROOT, TINY_BERT, load_config, read_metrics


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made by a test end with it."""
    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))


def test_builtin_entries():
    assert {"bert", "vit"} <= set(models.names())
    assert models.get("vit").modality == "image" and models.get("vit").input_keys == ("image",)
    text = models.get("bert")
    assert text.modality == "text"
    assert text.input_keys == ("input_ids", "attention_mask", "token_type_ids")
    batch = {"token_type_ids": 3, "label": 4, "attention_mask": 2, "input_ids": 1, "mask": 5}
    assert text.inputs(batch) == (1, 2, 3)  # in call order; other keys left out
    assert models.get("vit").inputs({"image": 7, "label": 0}) == (7,)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model.name 'gpt'; known: bert, llama, vit"):
        models.get("gpt")
    with pytest.raises(ValueError, match="unknown model.name 'gpt'"):
        factory.build({"name": "gpt"}, 3)


@pytest.mark.parametrize("name, cfg, module", [
    ("bert", {"checkpoint": "random", "bert": TINY_BERT}, bert.BERT),
    ("vit", {"checkpoint": "random", "variant": "Ti/16", "image_size": 16, "depth": 1}, vit.ViT),
])
def test_builtin_builds_take_their_inputs(name, cfg, module):
    entry = models.get(name)
    model, params, example = factory.build({"name": name, **cfg}, 3)
    assert isinstance(model, module)
    batch = {"image": np.zeros((2, 16, 16, 3), np.float32), "label": np.zeros(2, np.int32)}
    if entry.modality == "text":
        ids = np.ones((2, 8), np.int32)
        batch = {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}
    assert model.apply({"params": params}, *entry.inputs(batch)).shape == (2, 3)
    assert model.apply({"params": params}, *example).shape == (1, 3)


def test_the_bert_tokenizer_is_the_checkpoints():
    tok = models.get("bert").tokenizer({"checkpoint": "minilm_l6"}, 12)
    assert len(tok.encode("a short sentence").ids) == 12
    assert models.get("bert").tokenizer_folder({"checkpoint": "random"}) == str(
        bert_io.minilm_l6_path())


def test_registration_is_checked(own_registry):
    class Entry(models.ModelEntry):
        name, modality, input_keys = "mine", "image", ("image",)

    for field, value, message in (("name", "", "needs a name"),
                                  ("modality", "audio", "modality='audio'"),
                                  ("input_keys", ["image"], "input_keys"),
                                  ("input_keys", (), "input_keys"),
                                  ("modality", "text", "no tokenizer")):
        bad = Entry()
        setattr(bad, field, value)
        with pytest.raises(ValueError, match=message):
            models.register(bad)
    entry = models.register(Entry())
    assert models.get("mine") is entry and "mine" in models.names()
    with pytest.raises(ValueError, match="'mine' is already registered"):
        models.register(Entry())
    again = models.register(Entry(), replace=True)
    assert models.get("mine") is again

    class NotViT(Entry):
        name = "vit"

    with pytest.raises(ValueError, match="'vit' is already registered"):
        models.register(NotViT())


# A config file that brings its own model (as a user's would): an MLP on images, its head named
# ``head``, registered when the file is read; build loads what save writes.
OWN_MODEL_CONFIG = '''
import pathlib

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from surm import models


class MLP(nn.Module):
    hidden: int
    num_classes: int

    @nn.compact
    def __call__(self, image, train=False):
        x = image.reshape(image.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class TinyMLP(models.ModelEntry):
    name, modality, input_keys = "tiny_mlp", "image", ("image",)

    def build(self, cfg, num_classes, rng):
        model = MLP(cfg["hidden"], num_classes)
        image = np.zeros((1, cfg["image_size"], cfg["image_size"], 3), np.float32)
        if cfg["checkpoint"]:
            with np.load(cfg["checkpoint"], allow_pickle=False) as f:
                params = flax.traverse_util.unflatten_dict(dict(f), sep="/")
        else:
            params = model.init(rng, image)["params"]
        return model, params, (image,)

    def save(self, folder, run, params):
        path = pathlib.Path(folder) / "mlp.npz"
        np.savez(path, **flax.traverse_util.flatten_dict(jax.device_get(params), sep="/"))
        return path


models.register(TinyMLP())


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed, c.total_steps, c.eval_every, c.ckpt_every, c.log_every = 0, 2, 2, 2, 1
    c.model = dict(name="tiny_mlp", checkpoint="", hidden=16, image_size=8)
    c.input = dict(dataset=arg, data_dir="", batch_size=4, eval_batch_size=4)
    c.peft = dict(method="lora", structure="circulant", targets="hidden")
    c.optimizer = dict(name="adamw", lr=1e-2)
    c.mesh = dict(data=-1, fsdp=1, model=1)
    return c
'''


def test_a_model_registered_by_its_config_trains_loads_and_exports(tmp_path, own_registry):
    folder = tmp_path / "pets"
    make_image_folder(folder)
    config_file = tmp_path / "tiny_mlp.py"
    config_file.write_text(OWN_MODEL_CONFIG)
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "surm.train", "--config", f"{config_file}:folder:{folder}",
         "--workdir", str(workdir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [l["step"] for l in read_metrics(workdir) if "train_loss" in l] == [1, 2]
    assert any("test_accuracy" in l for l in read_metrics(workdir))

    # Unregistered here: loading names the known models and how to add one.
    with pytest.raises(ValueError, match="unknown model.name 'tiny_mlp'.*surm.models.register"):
        runs.load_run(workdir)
    # Read the config file in this process too: it registers the model.
    spec = importlib.util.spec_from_file_location("tiny_mlp_config", config_file)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    run = runs.load_run(workdir)
    assert run.entry is models.get("tiny_mlp") and run.num_classes == 3
    assert set(run.trainable["adapters"]) == {"hidden"}

    written = export.export(workdir, tmp_path / "out")
    assert written["merged"] == str(tmp_path / "out" / "merged" / "mlp.npz")
    labels = json.loads((tmp_path / "out" / "merged" / "labels.json").read_text())
    assert labels["labels"] == ["bird", "cat", "dog"]
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3)))
    model, merged, _ = factory.build({**run.config.model.to_dict(),
                                      "checkpoint": written["merged"]}, 3)
    np.testing.assert_allclose(
        np.asarray(model.apply({"params": merged}, images)),
        np.asarray(peft.apply(run.model, run.frozen, run.trainable, run.spec, images)),
        rtol=1e-4, atol=1e-5)


def test_a_model_without_save_has_no_merged_export(tmp_path, own_registry):
    """The run's own model, registered again without ``save``: refused before writing."""
    class NoSave(registry.ModelEntry):
        name, modality, input_keys = "nosave", "image", ("image",)

        def build(self, cfg, num_classes, rng):
            return models.get("vit").build({**cfg, "name": "vit"}, num_classes, rng)

    models.register(NoSave())
    config = load_config("vit_transfer", "checkpoint=random,variant=Ti/16,image_size=16")
    config.model.depth, config.model.name = 1, "nosave"
    workdir = fabricate_run(tmp_path / "run", config, ["a", "b"], "image")
    with pytest.raises(ValueError, match=r"model.name='nosave' has no save\(\)"):
        export.export(workdir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
