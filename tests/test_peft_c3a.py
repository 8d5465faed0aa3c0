"""Hugging Face PEFT's C3A folders <-> surm's block_circulant / circulant adapters: the update
is PEFT's formula (a numpy oracle written from it), the file format is pinned, and
surm -> C3A -> surm gives back the same bits (scripts/check_c3a.py checks against PEFT itself)."""
import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from surm import peft, structured
from surm.models import bert, bert_io
from surm.interop import c3a
from surm.peft import tree
from surm.peft import io as peft_io
from test_export import fabricate_run
from test_peft import randomize, tiny_bert
from test_train import TINY_BERT, load_config


def c3a_update(x, w):
    """PEFT's C3A update of x (..., d_in) with kernel w (d_out/b, d_in/b, b): per output block
    q, the sum over input blocks p of fft(ifft(x_p) * fft(w[q, p])).real, divided by d_in."""
    n_out, n_in, b = w.shape
    xs = x.reshape(*x.shape[:-1], n_in, b)
    out = np.zeros((*x.shape[:-1], n_out, b))
    for q in range(n_out):
        for p in range(n_in):
            out[..., q, :] += np.fft.fft(np.fft.ifft(xs[..., p, :]) * np.fft.fft(w[q, p])).real
    return out.reshape(*x.shape[:-1], n_out * b) / x.shape[-1]


def params(family, d_in, d_out, seed=0, **hp):
    return structured.get(family).init(jax.random.PRNGKey(seed), d_in, d_out, init="random",
                                       **hp)


@pytest.mark.parametrize("d_in,d_out,b", [(12, 8, 4), (8, 16, 8), (6, 6, 3)])
def test_kernel_update_is_peft_formula(d_in, d_out, b):
    x = np.random.default_rng(0).standard_normal((5, d_in))
    S = params("block_circulant", d_in, d_out, block_size=b)
    w = c3a.kernel_of(S, scale=0.7)
    assert w.shape == (d_out // b, d_in // b, b)
    dense = np.asarray(structured.get("block_circulant").to_dense(S), np.float64)
    np.testing.assert_allclose(c3a_update(x, w), 0.7 * x @ dense, atol=1e-12)
    # and back: a kernel (as PEFT makes one) read as block_circulant's c
    w = np.random.default_rng(1).standard_normal((d_out // b, d_in // b, b)).astype(np.float32)
    back = S.replace(c=c3a.block_circulant_of(w, d_in))
    dense = np.asarray(structured.get("block_circulant").to_dense(back), np.float64)
    np.testing.assert_allclose(x @ dense, c3a_update(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", ["plain", "hadamard"])
def test_square_circulant_is_one_block(form):
    x = np.random.default_rng(0).standard_normal((3, 10))
    S = params("circulant", 10, 10, form=form)
    w = c3a.kernel_of(S)
    assert w.shape == (1, 1, 10)
    np.testing.assert_allclose(c3a_update(x, w),
                               x @ np.asarray(structured.get("circulant").to_dense(S), np.float64),
                               atol=1e-12)
    with pytest.raises(ValueError, match="square layers only"):
        c3a.kernel_of(params("circulant", 10, 6))


def trained(spec, model_params):
    trainable, _ = peft.init(model_params, spec, jax.random.PRNGKey(0))
    trainable = randomize(trainable)
    head = trainable["base"]["classifier"]
    trainable["base"]["classifier"] = {k: v + 0.1 for k, v in head.items()}
    return trainable


def assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # with Params' family, shape, hp
    fa, fb = tree.flatten(a), tree.flatten(b)
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("family,hparams,targets", [
    ("block_circulant", {"block_size": 8}, "all-linear"),
    ("block_circulant", {}, "qkvo"),
    ("circulant", {}, "qv"),
])
def test_round_trip_is_bit_identical(tmp_path, family, hparams, targets):
    _, base, _ = tiny_bert()
    spec = peft.PeftSpec.create(structure=family, hparams=hparams, targets=targets)
    trainable = trained(spec, base)
    c3a.to_c3a(trainable, spec, tmp_path / "c3a")
    back, spec2 = c3a.from_c3a(tmp_path / "c3a", base, structure=family)
    assert_same_bits(back, trainable)  # Params metadata (shape, block size) included
    assert (spec2.structure, spec2.method, spec2.update_scale) == (family, "lora", 1.0)
    assert peft.targets(base, spec2) == peft.targets(base, spec)


def test_scale_is_folded_into_the_kernels(tmp_path):
    model, base, inputs = tiny_bert()
    spec = peft.PeftSpec.create(structure="block_circulant", hparams={"block_size": 16},
                                targets="qv", scale=2.5, learn_scale=True)
    trainable = trained(spec, base)
    node = trainable["adapters"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    node["scale"] = np.float32(-1.5)
    c3a.to_c3a(trainable, spec, tmp_path / "c3a", dtype="float32")
    back, spec2 = c3a.from_c3a(tmp_path / "c3a", base)
    assert not spec2.learn_scale and spec2.scale == 1.0
    frozen = peft.split(base, spec)[1]
    np.testing.assert_allclose(peft.apply(model, frozen, back, spec2, *inputs),
                               peft.apply(model, frozen, trainable, spec, *inputs), atol=1e-5)


def test_file_format(tmp_path):
    _, base, _ = tiny_bert()  # hidden 48, intermediate 96, 3 labels, pooling='pooler'
    spec = peft.PeftSpec.create(structure="block_circulant", hparams={"block_size": 8},
                                targets="qv")
    trainable = trained(spec, base)
    config = c3a.to_c3a(trainable, spec, tmp_path / "c3a", base_model="some/bert")
    assert json.loads((tmp_path / "c3a" / "adapter_config.json").read_text()) == config
    modules = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1)
               for m in ("query", "value")]
    assert config == {
        "peft_type": "C3A", "task_type": "SEQ_CLS", "base_model_name_or_path": "some/bert",
        "revision": None, "inference_mode": True, "block_size": 8, "block_size_pattern": {},
        "target_modules": modules, "bias": "none", "modules_to_save": ["classifier"],
        "layers_to_transform": None, "layers_pattern": None, "init_weights": True}
    tensors = safetensors.numpy.load_file(str(tmp_path / "c3a" / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype.name) for k, v in tensors.items()} == {
        **{f"base_model.model.{m}.c3a_kernel": ((6, 6, 8), "float64") for m in modules},
        "base_model.model.classifier.weight": ((3, 48), "float32"),
        "base_model.model.classifier.bias": ((3,), "float32")}
    np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"],
                                  trainable["base"]["classifier"]["kernel"].T)

    # Block sizes that differ (each module's gcd: 48 for 48 -> 48, 8 for 48 <-> 40): a pattern.
    cfg = bert.BertConfig(vocab_size=30, hidden_size=48, num_layers=1, num_heads=4,
                          intermediate_size=40, max_position_embeddings=8, pooling="mean")
    small = bert.BERT(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32))["params"]
    spec = peft.PeftSpec.create(structure="block_circulant", targets="re:.*(query|dense)")
    trainable = trained(spec, small)
    with pytest.raises(ValueError, match="head=False"):
        c3a.to_c3a(trainable, spec, tmp_path / "mean", pooling="mean")
    config = c3a.to_c3a(trainable, spec, tmp_path / "mean", pooling="mean", head=False)
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["modules_to_save"] is None
    assert config["block_size"] == 8
    assert config["block_size_pattern"] == {"encoder.layer.0.attention.self.query": 48,
                                            "encoder.layer.0.attention.output.dense": 48}
    back, spec2 = c3a.from_c3a(tmp_path / "mean", small)
    assert dict(spec2.hparams) == {}  # each module's gcd, surm's default
    assert_same_bits(back["adapters"], trainable["adapters"])
    np.testing.assert_array_equal(back["base"]["classifier"]["kernel"],
                                  small["classifier"]["kernel"])  # not in the file: the base's


def test_what_has_no_c3a_form_is_refused(tmp_path):
    _, base, _ = tiny_bert()
    with pytest.raises(ValueError, match="no C3A form"):
        spec = peft.PeftSpec.create(structure="lowrank", hparams={"rank": 2})
        c3a.to_c3a(trained(spec, base), spec, tmp_path / "x")
    spec = peft.PeftSpec.create(structure="block_circulant", targets="qv", train_bias=True)
    with pytest.raises(ValueError, match="bias"):
        c3a.to_c3a(trained(spec, base), spec, tmp_path / "x")
    spec = peft.PeftSpec.create(structure="block_circulant", hparams={"block_size": 8},
                                targets="qv")
    c3a.to_c3a(trained(spec, base), spec, tmp_path / "ok")
    with pytest.raises(FileExistsError):
        c3a.to_c3a(trained(spec, base), spec, tmp_path / "ok")
    with pytest.raises(ValueError, match="one-block kernels on square layers"):
        c3a.from_c3a(tmp_path / "ok", base, structure="circulant")
    weights = tmp_path / "ok" / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    tensors["base_model.model.bert.encoder.layer.0.attention.self.query.bias"] = np.zeros(48)
    safetensors.numpy.save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="unexpected .*self.query.bias"):
        c3a.from_c3a(tmp_path / "ok", base)


def test_cli_export_then_import_gives_the_run_back(tmp_path, capsys):
    config = load_config("default", "checkpoint=random,family=block_circulant,block_size=16",
                         **{"model.bert": TINY_BERT, "model.pooling": "pooler"})
    workdir = fabricate_run(tmp_path / "run", config, ["a", "b", "c"], "text")
    assert c3a.main(["export", str(workdir), str(tmp_path / "c3a")]) == 0
    from surm import runs
    run = runs.load_run(workdir)
    bert_io.save(tmp_path / "base", run.model.config, run.base)
    assert c3a.main(["import", str(tmp_path / "c3a"), str(tmp_path / "base"),
                     str(tmp_path / "back")]) == 0
    back, spec = peft_io.load(tmp_path / "back", run.base)
    assert_same_bits(back, run.trainable)
    assert json.loads((tmp_path / "back" / "base.json").read_text())["name"].startswith("bert:")
    assert c3a.main(["import", str(tmp_path / "c3a"), str(tmp_path / "base"),
                     str(tmp_path / "back")]) == 1
    assert "not an empty folder" in capsys.readouterr().err
