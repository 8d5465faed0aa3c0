"""Several named adapters over one base (PEFT's load_adapter / set_adapter /
add_weighted_adapter / delete_adapter): one runs exactly as peft.apply runs it, and a weighted
combination is the weighted sum of what each changes (checked through the unmerged products, a
path the combination does not use)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from surm import peft


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="query")(x) + nn.Dense(16, name="value")(x)
        return nn.Dense(3, name="head")(jnp.tanh(h))


class Linear(nn.Module):  # one layer: its outputs on the identity are its kernel
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="query")(x)


def _trained(params, spec, seed):
    """Adapters with non-zero values (as training leaves them)."""
    trainable, _ = peft.init(params, spec, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def test_one_adapter_runs_as_apply_and_a_combination_is_linear(tmp_path):
    model, x = Linear(), jnp.eye(16)
    params = model.init(jax.random.key(0), x)["params"]
    circ = peft.PeftSpec.create(method="lora", structure="circulant", targets=["query"],
                                heads=[])
    lora = peft.PeftSpec.create(method="lora", structure="lowrank", targets=["query"],
                                heads=[], hparams={"rank": 2})
    a, b = _trained(params, circ, 1), _trained(params, lora, 2)
    bank = peft.AdapterSet(model, params)
    bank.add("a", a, circ)
    peft.save(tmp_path / "b", b, lora, base=params)
    bank.load("b", tmp_path / "b")
    assert bank.names == ["a", "b"] and bank.active == {"a": 1.0}
    _, frozen_a = peft.split(params, circ)
    np.testing.assert_allclose(bank(x), peft.apply(model, frozen_a, a, circ, x), atol=1e-6)
    bank.set_adapter("b")
    out_b = np.asarray(bank(x))
    bank.set_adapter("a")
    out_a = np.asarray(bank(x))
    assert np.abs(out_a - out_b).max() > 1e-3  # two different adapters
    bias = np.asarray(params["query"]["bias"])
    for w in (0.25, 0.7, -0.5):
        bank.set_adapter({"a": w, "b": 1 - w})
        np.testing.assert_allclose(bank(x), w * out_a + (1 - w) * out_b, atol=2e-5)
    bank.set_adapter({"a": 2.0})  # a weight other than 1 scales the update
    np.testing.assert_allclose(bank(x) - bias, 2 * (out_a - bias) - (np.asarray(
        params["query"]["kernel"])), atol=2e-5)
    bank.delete_adapter("a")
    assert bank.names == ["b"]
    with pytest.raises(ValueError, match="no adapter is active"):
        bank(x)
    with pytest.raises(KeyError, match="no adapter named 'a'; loaded: b"):
        bank.set_adapter("a")


def test_heads_and_baselines_combine_and_bad_requests_are_named():
    model = Tiny()
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(0), x)["params"]
    circ = peft.PeftSpec.create(method="lora", structure="circulant", targets="query,value")
    bitfit = peft.PeftSpec.create(method="bitfit")
    a, b = _trained(params, circ, 1), _trained(params, bitfit, 2)
    bank = peft.AdapterSet(model, params)
    bank.add("a", a, circ)
    bank.add("b", b, bitfit)
    # the combination's parameters: every leaf the base plus the weighted changes
    bank.set_adapter({"a": 0.5, "b": 0.5})
    merged = bank.merged()
    head = 0.5 * (a["base"]["head"]["kernel"] + b["base"]["head"]["kernel"])
    np.testing.assert_allclose(merged["head"]["kernel"], head, atol=1e-6)
    np.testing.assert_allclose(merged["query"]["bias"], 0.5 * (
        params["query"]["bias"] + b["base"]["query"]["bias"]), atol=1e-6)
    assert bank(x).shape == (4, 3)
    adapter = peft.PeftSpec.create(method="adapter", structure="circulant", targets="query")
    bank.add("bottleneck", _trained(params, adapter, 3), adapter)
    bank.set_adapter("bottleneck")  # alone it runs
    assert bank(x).shape == (4, 3)
    with pytest.raises(ValueError, match="'bottleneck' .* is not a weight change"):
        bank.set_adapter({"a": 0.5, "bottleneck": 0.5})
    with pytest.raises(ValueError, match="already loaded"):
        bank.add("a", a, circ)
    with pytest.raises(ValueError, match="must be a finite number"):
        bank.set_adapter({"a": float("nan")})
