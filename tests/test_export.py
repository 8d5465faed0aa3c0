"""Exports: from the workdir alone (no data), each layout loads back into the model the run
trained, and says what it computes (the transformers / sentence-transformers layouts are pinned
here; scripts/check_hf_export.py runs them in those libraries)."""
import csv
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from surm import data, peft, runs, train
from surm.interop import export
from surm.models import bert, bert_io, factory, vit
from surm.peft import io as peft_io
from test_train import TINY_BERT, load_config

LABELS = ["business", "sport", "tech"]


def run_logits(workdir, *inputs):
    """The run's own (unmerged) forward pass."""
    run = runs.load_run(workdir)
    return np.asarray(peft.apply(run.model, run.frozen, run.trainable, run.spec, *inputs))


def token_batch(vocab=1000, length=12):
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (3, length), 1, vocab))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # padding, so mean pooling has a mask to respect
    mask[2, 4:] = 0
    return ids, mask


def fabricate_run(workdir, config, labels, modality):
    """A finished run as surm.train leaves it (config, record, adapters), with non-zero
    updates and head as after training, without the cost of training."""
    _, base, _ = factory.build(config.model, len(labels))
    spec = peft.config_to_spec(config.peft)
    trainable, _ = peft.init(base, spec, jax.random.PRNGKey(1))
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    trainable = jax.tree.unflatten(treedef, [
        np.asarray(x) + 0.05 * np.asarray(jax.random.normal(k, np.shape(x)))
        for x, k in zip(leaves, keys)])
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    runs.write_record(workdir, data.DatasetSpec(name="made-up", tfds_name="made-up",
                                                modality=modality, num_classes=len(labels),
                                                splits={}), labels)
    peft_io.save(workdir / "adapters", trainable, spec, base=None)
    return workdir


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A tiny mean-pooling BERT trained 2 steps on a CSV, whose data (file and cache) is then
    deleted: everything after training works from the workdir alone."""
    root = tmp_path_factory.mktemp("csv_run")
    rng = np.random.default_rng(0)
    words = {label: [f"{label[:3]}{i}" for i in range(8)] for label in LABELS}
    path = root / "data" / "news.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(90):
            label = LABELS[i % 3]
            writer.writerow([" ".join(rng.choice(words[label], 5)), label])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURM_DATA_DIR", str(root / "cache"))
        config = load_config("default", f"dataset=csv:{path},checkpoint=random,family=toeplitz",
                             **{"total_steps": 2, "eval_every": 0, "ckpt_every": 100,
                                "log_every": 1, "input.batch_size": 8,
                                "input.eval_batch_size": 8, "input.max_length": 16,
                                "model.bert": TINY_BERT})
        train.train_and_evaluate(config, str(root / "run"))
    shutil.rmtree(root / "data")
    shutil.rmtree(root / "cache", ignore_errors=True)
    return root / "run"


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to open a dataset fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"opened a dataset: {args}")
    monkeypatch.setattr(data, "get_spec", refuse)
    monkeypatch.setattr(data, "get_dataset", refuse)


@pytest.fixture(scope="module")
def csv_export(csv_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("csv_export") / "out"
    return export.export(csv_run, out)


def test_training_records_the_outputs(csv_run):
    record = json.loads((csv_run / runs.RECORD).read_text())
    assert record["num_classes"] == 3 and record["labels"] == LABELS
    assert record["regression"] is False and record["modality"] == "text"


def test_export_needs_only_the_workdir_and_loads_back(csv_run, csv_export, no_data, tmp_path):
    # (The data files were deleted after training; no_data refuses to open any dataset.)
    again = export.export(csv_run, tmp_path / "again")
    assert again["merged"] == str(tmp_path / "again" / "merged")
    ids, mask = token_batch()
    want = run_logits(csv_run, ids, mask)
    # Loaded back as the README says (checkpoint=E/merged), with and without pooling given:
    # the folder records mean pooling, and the head comes back with it.
    for pooling in ({"pooling": "mean"}, {}):
        model, params, _ = factory.build(
            {"name": "bert", "checkpoint": csv_export["merged"], **pooling}, 3)
        assert model.config.pooling == "mean"
        np.testing.assert_allclose(model.apply({"params": params}, ids, mask), want, atol=1e-4)
    labels = json.loads((pathlib.Path(csv_export["merged"]) / "labels.json").read_text())
    assert labels["labels"] == LABELS


def test_mean_pooling_export_is_a_pipeline_that_names_its_pooling(csv_run, csv_export):
    folder = pathlib.Path(csv_export["merged"])
    every_json = " ".join(p.read_text() for p in folder.rglob("*.json"))
    assert bert_io.HF_CLASSIFIER not in every_json  # transformers' class would compute otherwise
    hf = json.loads((folder / "config.json").read_text())
    assert hf["architectures"] == ["BertModel"] and hf["hidden_size"] == 32
    modules = json.loads((folder / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[1]) for m in modules] == [
        ("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense")]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_")
                   and k != "pooling_mode_mean_tokens")
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 16
    dense = json.loads((folder / "2_Dense" / "config.json").read_text())
    assert dense == {"in_features": 32, "out_features": 3, "bias": True,
                     "activation_function": "torch.nn.modules.linear.Identity"}
    encoder = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith(("bert.", "classifier", "pooler")) for k in encoder)
    head = safetensors.numpy.load_file(str(folder / "2_Dense" / "model.safetensors"))
    assert head["linear.weight"].shape == (3, 32) and head["linear.bias"].shape == (3,)
    assert (folder / "tokenizer.json").is_file()
    # What the pipeline computes: masked mean of the encoder's states, then the linear head.
    ids, mask = token_batch()
    config, params = bert_io.load(folder, num_labels=3)
    hidden = np.asarray(bert.BERT(config).apply({"params": params}, ids, mask, method="encode"))
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled @ head["linear.weight"].T + head["linear.bias"],
                               run_logits(csv_run, ids, mask), atol=1e-4)


def test_pooler_export_is_what_bert_for_sequence_classification_computes(tmp_path):
    config = load_config("bert_glue", "task=sst2,checkpoint=random,max_length=16,mode=lora")
    assert config.model.pooling == "pooler"  # tanh dense on [CLS], as transformers does
    workdir = fabricate_run(tmp_path / "run", config, ["neg", "pos"], "text")
    folder = pathlib.Path(export.export(workdir, tmp_path / "out")["merged"])
    assert not (folder / "modules.json").exists()
    hf = json.loads((folder / "config.json").read_text())
    assert hf["architectures"] == [bert_io.HF_CLASSIFIER]
    assert hf["id2label"] == {"0": "neg", "1": "pos"} and hf["label2id"] == {"neg": 0, "pos": 1}
    assert hf["problem_type"] == "single_label_classification"
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    assert {k for k in tensors if not k.startswith("bert.")} == {"classifier.weight",
                                                                  "classifier.bias"}
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(tensors)
    # transformers' head, from the file's own tensors: classifier(tanh(pooler([CLS] state))).
    ids, mask = token_batch()
    loaded, params = bert_io.load(folder, num_labels=2)
    assert loaded.pooling == "pooler"
    hidden = np.asarray(bert.BERT(loaded).apply({"params": params}, ids, mask, method="encode"))
    pooled = np.tanh(hidden[:, 0] @ tensors["bert.pooler.dense.weight"].T
                     + tensors["bert.pooler.dense.bias"])
    np.testing.assert_allclose(pooled @ tensors["classifier.weight"].T
                               + tensors["classifier.bias"],
                               run_logits(workdir, ids, mask), atol=1e-4)


def test_vit_export_records_its_architecture_and_loads_back(tmp_path):
    # A tiny DINOv2-like base (layer scale, exact GELU) whose file records its architecture.
    arch = dict(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, layer_scale=True,
                gelu_approximate=False)
    base_cfg = vit.ViTConfig(num_classes=1, image_size=8, **arch)
    params = factory._init(vit.ViT(base_cfg), jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3)))
    vit.save(tmp_path / "base.npz", params, arch={**arch, "posemb_method": "torch_bicubic"})
    config = load_config("vit_transfer", f"checkpoint={tmp_path / 'base.npz'},image_size=8")
    classes = [f"class{i}" for i in range(10)]  # the config's dataset, cifar10, has 10
    workdir = fabricate_run(tmp_path / "run", config, classes, "image")
    merged = export.export(workdir, tmp_path / "out")["merged"]
    # Loaded back with the config's (wrong) default variant B/16: the file's record wins.
    model, loaded, _ = factory.build({"name": "vit", "checkpoint": merged, "variant": "B/16",
                                      "image_size": 8}, 10)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (2, 8, 8, 3)))
    np.testing.assert_allclose(model.apply({"params": loaded}, images),
                               run_logits(workdir, images), atol=1e-5)
    assert vit.read_arch(merged) == {**arch, "posemb_method": "torch_bicubic"}


def test_old_workdirs_still_export_or_say_what_to_write(csv_run, no_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(csv_run, old)
    (old / runs.RECORD).unlink()  # a run from before the record: dataset.json still says
    assert runs.load_run(old).labels == LABELS
    (old / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match=r'does not record .* write .*outputs\.json as '
                                                r'\{"num_classes": N\}'):
        export.export(old, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed export writes nothing
    (old / runs.RECORD).write_text('{"num_classes": 3}')
    assert pathlib.Path(export.export(old, tmp_path / "out")["merged"]).is_dir()


def test_export_errors_are_one_line(csv_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [(tmp_path / "nothing", tmp_path / "o1", "not a finished surm.train workdir"),
             (csv_run, tmp_path / "full", "not an empty folder")]
    bad = tmp_path / "bad"
    shutil.copytree(csv_run, bad)
    (bad / runs.RECORD).write_text("{oops")
    cases.append((bad, tmp_path / "o2", "outputs.json is damaged"))
    wrong = tmp_path / "wrong"  # adapters that do not fit: a multi-line report, said in one
    shutil.copytree(csv_run, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model"]["bert"]["hidden_size"] = 16
    (wrong / "config.json").write_text(json.dumps(cfg))
    cases.append((wrong, tmp_path / "o3", "does not fit"))
    diverged = tmp_path / "diverged"  # NaN adapters are never merged into a model
    shutil.copytree(csv_run, diverged)
    from surm.peft import io as peft_io
    flat = peft_io.read_tensors(diverged / "adapters" / peft_io.WEIGHTS)
    flat = {k: np.full_like(v, np.nan) for k, v in flat.items()}
    safetensors.numpy.save_file(flat, str(diverged / "adapters" / peft_io.WEIGHTS))
    cases.append((diverged, tmp_path / "o4", "holds NaN/Inf"))
    for workdir, out, message in cases:
        assert export.run_cli(str(workdir), str(out)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))


def test_cls_pooling_saves_as_a_pipeline_and_loads_back(tmp_path):
    config = bert.BertConfig(num_labels=2, pooling="cls", vocab_size=1000, **{
        "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64})
    ids, mask = token_batch()
    params = factory._init(bert.BERT(config), jax.random.PRNGKey(0), ids)
    params["classifier"]["kernel"] = np.asarray(
        jax.random.normal(jax.random.PRNGKey(1), (32, 2)))
    bert_io.save(tmp_path / "cls", config, params, max_length=12)
    pooling = json.loads((tmp_path / "cls" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    assert bert_io.recorded_pooling(tmp_path / "cls") == "cls"
    loaded, back = bert_io.load(tmp_path / "cls", num_labels=2)
    assert loaded.pooling == "cls"
    np.testing.assert_allclose(bert.BERT(loaded).apply({"params": back}, ids, mask),
                               bert.BERT(config).apply({"params": params}, ids, mask),
                               atol=1e-5)
