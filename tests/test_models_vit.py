"""ViT: parameter names of the published checkpoints, the .npz loader and its error messages."""
import dataclasses
import logging

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surm.models import _loading, vit

TINY = vit.ViTConfig(num_classes=5, patch_size=4, image_size=16, width=32, depth=2, num_heads=4,
                     mlp_dim=64)


def _images(config, batch=2, seed=0):
    shape = (batch, config.image_size, config.image_size, 3)
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1, 1)


def _random_params(config, seed=0):
    """Initialised params with a non-zero head, so logits depend on every tensor."""
    params = vit.ViT(config).init(jax.random.key(seed), _images(config, 1))["params"]
    params = flax.core.unfreeze(params)
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    params["head"]["kernel"] = jax.random.normal(keys[0], params["head"]["kernel"].shape)
    params["cls"] = jax.random.normal(keys[1], params["cls"].shape)
    return jax.tree.map(np.asarray, params)


def _flat(params):
    return flax.traverse_util.flatten_dict(params, sep="/")


def _write_npz(path, flat):
    np.savez(path, **flat)
    return path


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_vit_ti16_param_names_and_shapes():
    cfg = vit.config_for("Ti/16", image_size=224, num_classes=1000)
    shapes = _loading.expected_shapes(vit.ViT(cfg), jnp.zeros((1, 224, 224, 3)))
    d, heads, mlp = 192, 3, 768
    want = {
        "embedding/kernel": (16, 16, 3, d), "embedding/bias": (d,), "cls": (1, 1, d),
        "Transformer/posembed_input/pos_embedding": (1, 197, d),
        "Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
        "head/kernel": (d, 1000), "head/bias": (1000,),
    }
    for i in range(12):
        b = f"Transformer/encoderblock_{i}"
        attn = f"{b}/MultiHeadDotProductAttention_1"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            want.update({f"{b}/{ln}/scale": (d,), f"{b}/{ln}/bias": (d,)})
        for proj in ("query", "key", "value"):
            want.update({f"{attn}/{proj}/kernel": (d, heads, d // heads),
                         f"{attn}/{proj}/bias": (heads, d // heads)})
        want.update({f"{attn}/out/kernel": (heads, d // heads, d), f"{attn}/out/bias": (d,),
                     f"{b}/MlpBlock_3/Dense_0/kernel": (d, mlp),
                     f"{b}/MlpBlock_3/Dense_0/bias": (mlp,),
                     f"{b}/MlpBlock_3/Dense_1/kernel": (mlp, d),
                     f"{b}/MlpBlock_3/Dense_1/bias": (d,)})
    assert shapes == want


@pytest.mark.parametrize("name, width, depth, heads, mlp", [
    ("Ti/16", 192, 12, 3, 768), ("S/32", 384, 12, 6, 1536), ("B/16", 768, 12, 12, 3072),
    ("L/14", 1024, 24, 16, 4096)])
def test_config_for_variants(name, width, depth, heads, mlp):
    cfg = vit.config_for(name, image_size=224, num_classes=10)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (width, depth, heads, mlp)
    assert cfg.patch_size == int(name.split("/")[1])


def test_factory_random_vit_of_fewer_blocks_equals_init():
    from surm.models import factory
    model, params, (images,) = factory.build(
        dict(name="vit", checkpoint="random", variant="Ti/16", image_size=32, depth=2), 3)
    assert sorted(k for k in params["Transformer"] if k.startswith("encoderblock")) == [
        "encoderblock_0", "encoderblock_1"]
    assert images.shape == (1, 32, 32, 3) and params["head"]["kernel"].shape == (192, 3)
    # the factory's shape-only initialisation gives exactly the values of model.init
    ref = model.init(jax.random.PRNGKey(0), images)["params"]
    assert jax.tree.structure(ref) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [dict(name="X/16"), dict(name="B16"),
                                 dict(name="B/16", image_size=225),
                                 dict(name="B/16", classifier="map"),
                                 dict(name="B/16", dtype="float33")])
def test_config_errors(bad):
    kwargs = {"image_size": 224, "num_classes": 10, **bad}
    with pytest.raises((ValueError, TypeError)):
        vit.config_for(kwargs.pop("name"), **kwargs)


def test_every_linear_layer_is_an_intercepted_dense():
    cfg = dataclasses.replace(TINY, representation_size=16)
    params = vit.ViT(cfg).init(jax.random.key(0), _images(cfg))
    called = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(
                context.module, (nn.Dense, nn.DenseGeneral)):
            called.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        vit.ViT(cfg).apply(params, _images(cfg))
    kernels = {k[:-len("/kernel")] for k in _flat(params["params"]) if k.endswith("/kernel")}
    assert set(called) == kernels - {"embedding"}
    assert len(called) == cfg.depth * 6 + 2


def test_npz_round_trip(tmp_path):
    params = _random_params(TINY)
    path = _write_npz(tmp_path / "tiny.npz", _flat(params))
    loaded = vit.load(path, TINY)
    _assert_trees_equal(loaded, params)
    model = vit.ViT(TINY)
    np.testing.assert_allclose(model.apply({"params": loaded}, _images(TINY)),
                               model.apply({"params": params}, _images(TINY)), rtol=0, atol=0)


def test_npz_linen_numbering_and_big_vision_layout(tmp_path):
    """big_vision: `params/` prefix, Linen block numbering, `pos_embedding` at the top without a
    [CLS] row (big_vision adds it before prepending [CLS], so the equivalent [CLS] is cls+pe[0])."""
    params = _random_params(TINY)
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
               "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    flat = {}
    for key, value in _flat(params).items():
        parts = key.split("/")
        if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = renames.get(parts[2], parts[2])
        flat["params/" + "/".join(parts)] = value
    pe = flat.pop("params/Transformer/posembed_input/pos_embedding")
    flat["params/pos_embedding"] = pe[:, 1:]
    flat["params/cls"] = params["cls"] + pe[:, :1]
    path = _write_npz(tmp_path / "bv.npz", flat)

    loaded = vit.load(path, TINY)
    assert "MlpBlock_3" in loaded["Transformer"]["encoderblock_1"]
    np.testing.assert_array_equal(loaded["Transformer"]["posembed_input"]["pos_embedding"][:, 0],
                                  0)
    model = vit.ViT(TINY)
    np.testing.assert_allclose(model.apply({"params": loaded}, _images(TINY)),
                               model.apply({"params": params}, _images(TINY)), atol=1e-5)


def test_npz_old_vit_jax_prefix_ignores_optimizer_state(tmp_path, caplog):
    params = _random_params(TINY)
    flat = {"opt/target/" + k: v for k, v in _flat(params).items()}
    flat["opt/state/step"] = np.array(10)
    path = _write_npz(tmp_path / "old.npz", flat)
    with caplog.at_level(logging.INFO, logger="surm.models.vit"):
        loaded = vit.load(path, TINY)
    _assert_trees_equal(loaded, params)
    assert "ignoring 1 entries" in caplog.text


@pytest.mark.parametrize("method", ["bilinear", "cubic"])
def test_posemb_resampled_to_new_grid_keeps_cls(tmp_path, caplog, method):
    params = _random_params(TINY)
    old_pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    path = _write_npz(tmp_path / "tiny.npz", _flat(params))
    big = dataclasses.replace(TINY, image_size=32)  # Grid 4x4 -> 8x8.
    with caplog.at_level(logging.INFO, logger="surm.models.vit"):
        loaded = vit.load(path, big, posemb_method=method)
    assert "resampling position embeddings" in caplog.text
    pe = loaded["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 1 + 8 * 8, TINY.width)
    np.testing.assert_array_equal(pe[:, 0], old_pe[:, 0])
    # Upsampling interpolates: the new grid stays within the old grid's range per channel.
    old_grid, new_grid = old_pe[0, 1:], pe[0, 1:]
    slack = 0.2 * np.ptp(old_grid, axis=0)  # Cubic overshoots a little.
    assert np.all(new_grid >= old_grid.min(0) - slack)
    assert np.all(new_grid <= old_grid.max(0) + slack)
    logits = vit.ViT(big).apply({"params": loaded}, _images(big))
    assert logits.shape == (2, TINY.num_classes) and np.all(np.isfinite(logits))


def test_resample_posemb_identity_constant_and_gap():
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
    np.testing.assert_allclose(vit.resample_posemb(pe, 4, 1), pe, atol=1e-6)
    constant = np.ones((1, 9, 8), np.float32)  # 'gap': no prefix token, 3x3 -> 5x5.
    np.testing.assert_allclose(vit.resample_posemb(constant, 5, 0), np.ones((1, 25, 8)),
                               atol=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        vit.resample_posemb(pe[:, :-1], 4, 1)


def test_fresh_head_for_another_class_count(tmp_path, caplog):
    params = _random_params(TINY)
    path = _write_npz(tmp_path / "tiny.npz", _flat(params))
    seven = dataclasses.replace(TINY, num_classes=7)
    with caplog.at_level(logging.INFO, logger="surm.models.vit"):
        loaded = vit.load(path, seven)
    assert "fresh zero-initialised head" in caplog.text
    assert loaded["head"]["kernel"].shape == (TINY.width, 7)
    assert not loaded["head"]["kernel"].any() and not loaded["head"]["bias"].any()
    np.testing.assert_array_equal(loaded["cls"], params["cls"])


def test_pre_logits_dropped_when_config_has_none(tmp_path, caplog):
    with_repr = dataclasses.replace(TINY, representation_size=16)
    path = _write_npz(tmp_path / "repr.npz", _flat(_random_params(with_repr)))
    with caplog.at_level(logging.INFO, logger="surm.models.vit"):
        loaded = vit.load(path, TINY)
    assert "pre_logits" not in loaded and "dropping pre_logits" in caplog.text
    assert loaded["head"]["kernel"].shape == (TINY.width, TINY.num_classes)
    assert not loaded["head"]["kernel"].any()


def test_errors_name_missing_unexpected_and_misshaped_keys(tmp_path):
    flat = _flat(_random_params(TINY))
    flat.pop("Transformer/encoderblock_1/LayerNorm_2/scale")
    flat["Transformer/encoderblock_0/extra/kernel"] = np.zeros((3, 3), np.float32)
    flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((32, 65), np.float32)
    path = _write_npz(tmp_path / "bad.npz", flat)
    with pytest.raises(ValueError) as err:
        vit.load(path, TINY)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing     Transformer/encoderblock_1/LayerNorm_2/scale: model expects (32,)" in msg
    assert "unexpected  Transformer/encoderblock_0/extra/kernel: checkpoint has (3, 3)" in msg
    assert ("mis-shaped  Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel: checkpoint has "
            "(32, 65), model expects (32, 64)") in msg


def test_other_patch_size_is_reported_not_resampled(tmp_path):
    path = _write_npz(tmp_path / "tiny.npz", _flat(_random_params(TINY)))
    with pytest.raises(ValueError, match=r"embedding/kernel: checkpoint has \(4, 4, 3, 32\)"):
        vit.load(path, dataclasses.replace(TINY, patch_size=8))


def test_missing_file_names_path_and_source(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz") as err:
        vit.load(path, TINY)
    assert "gs://vit_models" in str(err.value)


def test_bfloat16_compute_is_close_to_float32():
    params = _random_params(TINY)
    f32 = vit.ViT(TINY).apply({"params": params}, _images(TINY))
    bf16 = vit.ViT(dataclasses.replace(TINY, dtype="bfloat16")).apply(
        {"params": params}, _images(TINY))
    assert bf16.dtype == jnp.float32  # Logits come back in float32.
    np.testing.assert_allclose(bf16, f32, atol=0.05 * float(jnp.abs(f32).max()))


def test_dropout_in_training_mode():
    cfg = dataclasses.replace(TINY, dropout=0.5, attention_dropout=0.5)
    params = _random_params(cfg)
    model, images = vit.ViT(cfg), _images(cfg)
    eval_logits = model.apply({"params": params}, images)
    train = [model.apply({"params": params}, images, train=True,
                         rngs={"dropout": jax.random.key(s)}) for s in (1, 2)]
    assert not np.allclose(train[0], train[1]) and not np.allclose(train[0], eval_logits)
    np.testing.assert_array_equal(eval_logits, model.apply({"params": params}, images))


def test_gap_classifier_and_token_checkpoint_mismatch(tmp_path):
    gap = dataclasses.replace(TINY, classifier="gap")
    shapes = _loading.expected_shapes(vit.ViT(gap), _images(gap, 1))
    assert "cls" not in shapes and shapes["Transformer/posembed_input/pos_embedding"] == (1, 16, 32)
    path = _write_npz(tmp_path / "token.npz", _flat(_random_params(TINY)))
    with pytest.raises(ValueError) as err:
        vit.load(path, gap)
    assert "unexpected  cls: checkpoint has (1, 1, 32)" in str(err.value)
    assert ("mis-shaped  Transformer/posembed_input/pos_embedding: checkpoint has (1, 17, 32), "
            "model expects (1, 16, 32)") in str(err.value)


def test_wrong_image_size_is_a_clear_error():
    params = _random_params(TINY)
    with pytest.raises(ValueError, match=r"the config wants \(batch, 16, 16, 3\)"):
        vit.ViT(TINY).apply({"params": params}, jnp.zeros((1, 32, 32, 3)))


# DINOv2-style options: layer scale, exact GELU, PyTorch-bicubic position embeddings, and the
# architecture record of converted checkpoints.

DINO = dataclasses.replace(TINY, layer_scale=True, gelu_approximate=False)


def test_layer_scale_params_and_effect():
    shapes = _loading.expected_shapes(vit.ViT(DINO), _images(DINO, 1))
    for i in range(DINO.depth):
        for name in ("layer_scale_attn", "layer_scale_mlp"):
            assert shapes[f"Transformer/encoderblock_{i}/{name}/scale"] == (DINO.width,)
    assert len(shapes) == len(_loading.expected_shapes(vit.ViT(TINY), _images(TINY, 1))) + 4
    # Zero layer scales make every block the identity: the model of depth 0.
    params = _random_params(DINO)
    flat = {k: (np.zeros_like(v) if "layer_scale" in k else v) for k, v in _flat(params).items()}
    shallow = dataclasses.replace(DINO, depth=0)
    kept = {k: v for k, v in flat.items() if "encoderblock" not in k}
    np.testing.assert_allclose(
        jax.jit(vit.ViT(DINO).apply)(
            {"params": flax.traverse_util.unflatten_dict(flat, sep="/")}, _images(DINO)),
        jax.jit(vit.ViT(shallow).apply)(
            {"params": flax.traverse_util.unflatten_dict(kept, sep="/")}, _images(DINO)),
        atol=1e-5)


@pytest.mark.parametrize("approximate", [True, False])
def test_mlp_gelu_form(approximate):
    block = vit.MlpBlock(mlp_dim=16, dropout=0.0, dtype=jnp.float32,
                         gelu_approximate=approximate)
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 3
    params = block.init(jax.random.key(1), x, train=False)
    p = params["params"]
    hidden = jax.nn.gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"],
                         approximate=approximate)
    want = hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    np.testing.assert_allclose(block.apply(params, x, train=False), want, atol=1e-5)


def test_torch_bicubic_resample_identity_constant_and_errors():
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1, 1 + 25, 4)).astype(np.float32)
    np.testing.assert_allclose(vit.resample_posemb(pe, 5, 1, "torch_bicubic"), pe, atol=1e-6)
    constant = np.full((1, 1 + 37 * 37, 3), 2.5, np.float32)
    for grid in (2, 4, 16, 50):  # The weights sum to 1 whatever the clamping at the edges.
        out = vit.resample_posemb(constant, grid, 1, "torch_bicubic")
        np.testing.assert_allclose(out, np.full((1, 1 + grid * grid, 3), 2.5), atol=1e-5)
    with pytest.raises(ValueError, match="Unknown position-embedding resampling 'lanczos'"):
        vit.resample_posemb(pe, 4, 1, "lanczos")


def test_arch_record_round_trip_and_mismatch(tmp_path):
    params = _random_params(DINO)
    path = tmp_path / "dino.npz"
    arch = {k: getattr(DINO, k) for k in vit.ARCH_FIELDS} | {"posemb_method": "torch_bicubic"}
    vit.save(path, params, arch=arch)
    assert vit.read_arch(path) == arch
    assert vit.read_arch(_write_npz(tmp_path / "plain.npz", _flat(params))) == {}
    config = vit.checkpoint_config(path, num_classes=TINY.num_classes, image_size=16)
    assert config == DINO
    _assert_trees_equal(vit.load(path, config), params)
    # The recorded method resamples: 4x4 -> 6x6 as PyTorch's bicubic.
    big = vit.checkpoint_config(path, num_classes=TINY.num_classes, image_size=24)
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_allclose(vit.load(path, big)["Transformer"]["posembed_input"]
                               ["pos_embedding"], vit.resample_posemb(pe, 6, 1, "torch_bicubic"))
    with pytest.raises(ValueError, match=r"config has gelu_approximate=True \(checkpoint: False\)"):
        vit.load(path, dataclasses.replace(DINO, gelu_approximate=True))
    with pytest.raises(ValueError, match=r"unknown architecture fields \['heads'\]"):
        vit.save(tmp_path / "bad.npz", params, arch={"heads": 4})
