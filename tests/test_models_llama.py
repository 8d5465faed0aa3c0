"""The Llama decoder and its GGUF loader, on tiny random models and tiny GGUF files written here."""
import struct

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surm import peft
from surm.models import gguf, llama, llama_generate, llama_gguf

# ------------------------------------------------------------ a GGUF v3 writer for the tests


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(v) -> bytes:
    """Type id and bytes of a metadata value: str, bool, int (uint32), float (float32), a list
    of str, or a numpy array of int32 / float32."""
    if isinstance(v, str):
        return struct.pack("<I", 8) + _string(v)
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_string(s) for s in v)
    v = np.asarray(v)
    etype = {np.dtype("int32"): 5, np.dtype("float32"): 6}[v.dtype]
    return struct.pack("<IIQ", 9, etype, v.size) + v.astype("<" + v.dtype.str[1:]).tobytes()


def write_gguf(path, metadata: dict, tensors: list, alignment: int = 32):
    """tensors: (name, ggml type, numpy shape, raw bytes)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        head += _string(key) + _value(value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += raw
    for (name, ggml_type, shape, _), offset in zip(tensors, offsets):
        head += _string(name) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        head += struct.pack("<IQ", ggml_type, offset)
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head + data)


def f32(name, a):
    a = np.ascontiguousarray(a, "<f4")
    return name, gguf.F32, a.shape, a.tobytes()


# ------------------------------------------------------------ dequantisation by hand


def test_reader_dequantises_q8_0_and_q4_1_as_computed_by_hand(tmp_path):
    # Q8_0: one row of 32 = one block: float16 d = 0.5, int8 q = -16..15 -> x = 0.5 q
    q8 = np.arange(-16, 16, dtype=np.int8)
    q8_raw = np.float16(0.5).tobytes() + q8.tobytes()
    # Q4_1: one block: d = 0.25, m = -1; byte j holds element j (low nibble) and j + 16 (high)
    lo, hi = np.arange(16, dtype=np.uint8), (15 - np.arange(16)).astype(np.uint8)
    q4_raw = np.float16(0.25).tobytes() + np.float16(-1).tobytes() + (lo | hi << 4).tobytes()
    f16 = np.array([[1.5, -2.0]], np.float16)
    path = tmp_path / "q.gguf"
    write_gguf(path, {"general.architecture": "test", "n": 7, "names": ["a", "bc"],
                      "ids": np.array([3, 4], np.int32), "general.alignment": 64},
               [("q8", gguf.Q8_0, (1, 32), q8_raw), ("q4", gguf.Q4_1, (1, 32), q4_raw),
                ("h", gguf.F16, (1, 2), f16.tobytes()), f32("f", np.eye(2))], alignment=64)
    f = gguf.GGUFFile(path)
    assert f.metadata["n"] == 7 and f.metadata["names"] == ["a", "bc"]
    np.testing.assert_array_equal(f.metadata["ids"], [3, 4])
    want_q8 = [0.5 * q for q in range(-16, 16)]
    want_q4 = [0.25 * j - 1 for j in range(16)] + [0.25 * (15 - j) - 1 for j in range(16)]
    np.testing.assert_array_equal(f.array("q8"), [want_q8])
    np.testing.assert_array_equal(f.array("q4"), [want_q4])
    np.testing.assert_array_equal(f.array("h"), [[1.5, -2.0]])
    np.testing.assert_array_equal(f.array("f"), np.eye(2))
    assert f.tensors["q4"].type_name == "Q4_1"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16", "BF16"])
def test_reader_agrees_with_the_gguf_package(tmp_path, qtype):
    """Bytes quantised by the ``gguf`` package (llama.cpp's gguf-py) read back as it reads them."""
    ref = pytest.importorskip("gguf")
    kind = ref.GGMLQuantizationType[qtype]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    raw = np.asarray(ref.quants.quantize(x, kind))
    path = tmp_path / "ref.gguf"
    write_gguf(path, {}, [("w", int(kind), x.shape, raw.tobytes())])
    np.testing.assert_array_equal(gguf.GGUFFile(path).array("w"),
                                  ref.quants.dequantize(raw, kind).reshape(x.shape))


def test_reader_refuses_other_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\3\4" + b"\0" * 40)
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.GGUFFile(bad)


# ------------------------------------------------------------ a tiny random decoder

CONFIG = llama.LlamaConfig(vocab_size=24, dim=16, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_dim=24, rope_base=100.0, max_len=64, bos_id=0, eos_id=1)
TOKENS = ["<s>", "</s>", "a", "b", "Ġ", "ab", "Ġa", "Ġab"] + [f"x{i}" for i in range(16)]


def random_params(config=CONFIG, seed=0):
    model = llama.Llama(config)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    # norms away from 1 so that a wrong mapping shows
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    rng = np.random.default_rng(seed)
    flat = {k: (1 + 0.1 * rng.standard_normal(v.shape) if k.endswith("scale") else np.asarray(v))
            for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32)
                                              for k, v in flat.items()}, sep="/")


def gguf_metadata(config=CONFIG):
    return {"general.architecture": "llama", "llama.block_count": config.n_layers,
            "llama.context_length": config.max_len, "llama.embedding_length": config.dim,
            "llama.feed_forward_length": config.ffn_dim,
            "llama.attention.head_count": config.n_heads,
            "llama.attention.head_count_kv": config.n_kv_heads,
            "llama.rope.freq_base": config.rope_base,
            "llama.attention.layer_norm_rms_epsilon": config.norm_eps,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.token_type": np.array([3, 3] + [1] * 22, np.int32),
            "tokenizer.ggml.merges": ["Ġ a", "Ġa b", "a b"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}


def gguf_tensors(params, config=CONFIG):
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = []
    for name, (path, transpose) in llama_gguf.tensor_map(config).items():
        a = np.asarray(flat[path])
        out.append(f32(name, a.T if transpose else a))
    return out


@pytest.fixture(scope="module")
def tiny():
    return llama.Llama(CONFIG), random_params()


def test_loader_maps_every_tensor_and_caches(tmp_path, tiny):
    _, params = tiny
    path = tmp_path / "tiny.gguf"
    write_gguf(path, gguf_metadata(), gguf_tensors(params))
    want = flax.traverse_util.flatten_dict(params, sep="/")
    for cache in (False, True, True):  # direct, converting into the cache, from the cache
        config, loaded, tok = llama_gguf.load_gguf(path, cache=cache, directory=tmp_path / "c")
        assert dataclasses_equal(config, CONFIG)
        got = flax.traverse_util.flatten_dict(loaded, sep="/")
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    _, half, _ = llama_gguf.load_gguf(path, dtype=jnp.bfloat16, directory=tmp_path / "c")
    assert half["layers_0"]["attn"]["k_proj"]["kernel"].dtype == jnp.bfloat16
    assert tok.encode("ab ab").tokens == ["ab", "Ġab"]
    assert tok.encode("<s>a").ids == [0, 2]
    assert tok.decode([5, 7]) == "ab ab"


def test_a_damaged_model_cache_is_converted_again_and_an_empty_gguf_is_named(tmp_path, tiny,
                                                                           capsys):
    """A cut, a garbage or a bit-flipped cache file (the zip's CRC) is never loaded, nor
    loaded unsafely: it is converted again from the GGUF file, with a note."""
    _, params = tiny
    path = tmp_path / "tiny.gguf"
    write_gguf(path, gguf_metadata(), gguf_tensors(params))
    want = flax.traverse_util.flatten_dict(params, sep="/")
    npz = llama_gguf.cached_npz(path, directory=tmp_path / "c")
    good = npz.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    for damaged in (good[:len(good) // 3], b"junk" * 100, bytes(flipped)):
        npz.write_bytes(damaged)
        _, loaded, _ = llama_gguf.load_gguf(path, directory=tmp_path / "c")
        got = flax.traverse_util.flatten_dict(loaded, sep="/")
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert "is damaged" in capsys.readouterr().err
        assert npz.read_bytes() == good
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.gguf is not a GGUF file: 0 bytes"):
        llama_gguf.load_gguf(empty, directory=tmp_path / "c")


def dataclasses_equal(a, b):
    return all(getattr(a, f) == getattr(b, f) for f in
               ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                "rope_base", "max_len", "tie_embeddings", "bos_id", "eos_id")) and \
        np.isclose(a.norm_eps, b.norm_eps)


@pytest.mark.parametrize("problem", ["missing", "extra", "type"])
def test_loader_errors_name_the_tensor(tmp_path, tiny, problem):
    _, params = tiny
    tensors = gguf_tensors(params)
    if problem == "missing":
        tensors = [t for t in tensors if t[0] != "blk.1.attn_v.weight"]
        match = r"missing\s+blk\.1\.attn_v\.weight"
    elif problem == "extra":
        tensors.append(f32("blk.2.attn_v.weight", np.zeros((8, 16))))
        match = r"unexpected\s+blk\.2\.attn_v\.weight"
    else:
        name, _, shape, raw = tensors[3]
        tensors[3] = (name, 12, shape, raw)  # Q4_K
        match = rf"{name}.*Q4_K"
    path = tmp_path / "bad.gguf"
    write_gguf(path, gguf_metadata(), tensors)
    with pytest.raises(ValueError, match=match):
        llama_gguf.load_gguf(path, cache=False)


def test_output_head_is_read_when_the_file_has_one(tmp_path, tiny):
    _, params = tiny
    head = np.random.default_rng(1).standard_normal((CONFIG.vocab_size, CONFIG.dim))
    path = tmp_path / "untied.gguf"
    write_gguf(path, gguf_metadata(), gguf_tensors(params) + [f32("output.weight", head)])
    config, loaded, _ = llama_gguf.load_gguf(path, cache=False)
    assert not config.tie_embeddings
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], head.T.astype(np.float32))


# ------------------------------------------------------------ the model


def test_rope_matches_rotate_half_on_hugging_face_layout():
    """llama.cpp stores q/k rows permuted from HF's half-split order to interleaved pairs;
    interleaved rotation of the permuted vector is the permuted rotate-half rotation."""
    d, base = 8, 100.0
    x = np.random.default_rng(0).standard_normal((1, 5, 1, d)).astype(np.float32)
    pos = np.arange(5)
    freqs = base ** (-np.arange(0, d, 2) / d)
    angle = np.concatenate([pos[:, None] * freqs] * 2, axis=-1)[None, :, None]
    rotate_half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    hf = x * np.cos(angle) + rotate_half * np.sin(angle)
    perm = lambda v: v.reshape(*v.shape[:-1], 2, d // 2).swapaxes(-1, -2).reshape(v.shape)
    np.testing.assert_allclose(llama.rope(jnp.asarray(perm(x)), jnp.asarray(pos), base),
                               perm(hf), atol=1e-5)


def test_causal_mask(tiny):
    model, params = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9)))
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % CONFIG.vocab_size)
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    a, b = forward(tokens), forward(changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4


def test_cached_decoding_equals_full_recomputation(tiny):
    model, params = tiny
    prompt = np.array([[3, 5, 2, 7], [9, 9, 4, 1]], np.int32)
    new = llama_generate.generate(model, params, prompt, 6)
    # without a cache: the whole sequence each time (padded to one length; causal, so the
    # padding after position t does not change its logits)
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    seq = np.zeros((2, 10), np.int32)
    seq[:, :4] = prompt
    for t in range(4, 10):
        seq[:, t] = np.argmax(forward(jnp.asarray(seq))[:, t - 1], -1)
    np.testing.assert_array_equal(new, seq[:, 4:])
    # the cached logits equal the full ones position by position
    cache = llama.init_cache(CONFIG, 2, 10)
    cached = jax.jit(lambda t, c, i: model.apply({"params": params}, t, c, i))
    first, cache = cached(jnp.asarray(seq[:, :4]), cache, 0)
    rest, _ = cached(jnp.asarray(seq[:, 4:8]), cache, 4)
    np.testing.assert_allclose(np.concatenate([first, rest], 1), forward(jnp.asarray(seq))[:, :8],
                               atol=1e-5)


def test_generate_stops_at_eos_and_samples(tiny):
    model, params = tiny
    greedy = llama_generate.generate(model, params, [3, 5], 5)
    eos = int(greedy[-1])
    stop = llama_generate.generate(model, params, [3, 5], 5, eos_id=eos)
    np.testing.assert_array_equal(stop, greedy[:list(greedy).index(eos) + 1])
    sampled = llama_generate.generate(model, params, [3, 5], 5, temperature=1.0, top_p=0.9,
                             rng=jax.random.key(3))
    assert sampled.shape == (5,) and sampled.max() < CONFIG.vocab_size
    # top_p so small that only the most likely token is left: greedy again
    np.testing.assert_array_equal(llama_generate.generate(model, params, [3, 5], 5, temperature=1.0,
                                                 top_p=1e-6, rng=jax.random.key(3)), greedy)
    with pytest.raises(ValueError, match="needs an rng"):
        llama_generate.generate(model, params, [3, 5], 2, temperature=1.0)


def test_new_prompt_lengths_and_token_counts_reuse_the_compiled_steps(tiny):
    """Prompts and caches are padded to buckets: lengths 3 and 9, 4 and 7 new tokens, run the
    same two compiled programs (prompt, then one token), and give what each alone gives."""
    model, params = tiny
    step = llama_generate._decode_step(model)
    llama_generate.generate(model, params, [3, 5, 2], 4)
    compiled = step._cache_size()
    stats = {}
    a = llama_generate.generate(model, params, [3, 5, 2, 7, 4, 1, 1, 2, 3], 7, stats=stats)
    # (other tests in this process may have compiled sampling variants of the same step: count
    # only what this call adds)
    assert step._cache_size() == compiled
    assert stats["prompt_tokens"] == 9 and stats["new_tokens"] == 7 and stats["tokens_per_s"] > 0
    # the padding is never seen: the same tokens as a cache of exactly the needed length
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    seq = np.zeros((1, 16), np.int32)
    seq[0, :9] = [3, 5, 2, 7, 4, 1, 1, 2, 3]
    for t in range(9, 16):
        seq[0, t] = np.argmax(forward(jnp.asarray(seq))[0, t - 1])
    np.testing.assert_array_equal(a, seq[0, 9:])


def test_the_chat_template_of_the_file_is_rendered_as_hugging_face_does():
    """SmolLM2's template (from its GGUF file) adds its default system turn when none is
    given; the rendering is the one transformers' apply_chat_template gives for it."""
    from surm.models import factory
    entry = factory.registry.get("llama")
    template = entry.chat_template({"checkpoint": "smollm2"})
    assert llama_generate.chat_prompt("Hi", template=template) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert llama_generate.chat_prompt("Hi", system="Be brief.", template=template) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(Exception):  # a template runs in a sandbox: no Python from a file
        llama_generate.render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_structured_adapters_on_rectangular_gqa_projections(tiny):
    model, params = tiny
    tokens = jnp.asarray([[3, 5, 2, 7, 4]])
    layers = peft.layers.trace(model, params, tokens)
    assert (layers["layers_0/attn/k_proj"].d_in, layers["layers_0/attn/k_proj"].d_out) == (16, 8)
    spec = peft.PeftSpec.create(
        method="lora", structure="circulant", init="random", heads=(), targets="all-linear")
    trainable, frozen = peft.init(params, spec, jax.random.key(1), layers=layers)
    assert peft.targets(params, spec, layers)["layers_1/attn/v_proj"] == (16, 8)
    assert sorted(peft.targets(params, spec, layers)) == sorted(
        f"layers_{i}/{m}" for i in range(2) for m in
        ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
         "mlp/up_proj", "mlp/down_proj"))
    assert peft.match_targets(["qv"], layers) == [
        f"layers_{i}/attn/{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    adapted = jax.jit(lambda tr: peft.apply(model, frozen, tr, spec, tokens))(trainable)
    forward = jax.jit(lambda p: model.apply({"params": p}, tokens))
    assert np.abs(adapted - forward(params)).max() > 1e-4
    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)
    np.testing.assert_allclose(forward(merged), adapted, atol=1e-4)
