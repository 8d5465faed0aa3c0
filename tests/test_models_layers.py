"""surm.models.layers: hash dropout masks, exact GELU, attention; surm.allocator."""
import math
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from surm.models import layers


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_mask_has_the_asked_rate(rate):
    n = 1 << 20
    keep = np.asarray(layers.keep_mask(jax.random.PRNGKey(3), (n,), rate))
    # A binomial(n, 1 - rate) count: 5 standard deviations either side.
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(keep.sum() - n * (1 - rate)) < 5 * sd


def test_keep_masks_are_independent_across_elements_and_keys():
    shape = (64, 128, 96)
    a = np.asarray(layers.keep_mask(jax.random.PRNGKey(0), shape, 0.5)).astype(float)
    b = np.asarray(layers.keep_mask(jax.random.PRNGKey(1), shape, 0.5)).astype(float)
    flat = a.ravel()
    n = flat.size
    # Neighbours (along every axis, and the counter's +1), and two keys: uncorrelated.
    pairs = [(flat[:-1], flat[1:]), (a[:, :-1].ravel(), a[:, 1:].ravel()),
             (a[:-1].ravel(), a[1:].ravel()), (flat, b.ravel())]
    for x, y in pairs:
        r = np.corrcoef(x, y)[0, 1]
        assert abs(r) < 5 / math.sqrt(n), r
    # Pairs of neighbours fall in the four (keep, keep) cells evenly: a chi-square test.
    cells = np.bincount((2 * flat[:-1] + flat[1:]).astype(int), minlength=4)
    assert scipy.stats.chisquare(cells).pvalue > 1e-4
    # The same key gives the same mask; a key split from it a different one.
    again = np.asarray(layers.keep_mask(jax.random.PRNGKey(0), shape, 0.5))
    assert np.array_equal(again, a.astype(bool))
    assert 0.45 < np.mean(a != b) < 0.55


def test_dropout_scales_the_kept_elements_and_keeps_the_mean():
    x = jnp.ones((256, 1024))
    y = np.asarray(layers.dropout(x, 0.25, jax.random.PRNGKey(7)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01
    assert np.array_equal(np.asarray(layers.dropout(x, 0.0, jax.random.PRNGKey(7))), x)
    assert not np.asarray(layers.dropout(x, 1.0, jax.random.PRNGKey(7))).any()


def test_dropout_module_draws_its_own_key_per_layer_and_step():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return (layers.Dropout(0.5)(x, deterministic=not train),
                    layers.Dropout(0.5)(x, deterministic=not train))

    x = jnp.ones((64, 64))
    a, b = Two().apply({}, x, True, rngs={"dropout": jax.random.PRNGKey(0)})
    c, _ = Two().apply({}, x, True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    same, _ = Two().apply({}, x, False)
    assert np.array_equal(same, x)


def test_gelu_is_the_exact_erf_form():
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    want = 0.5 * x.astype(np.float64) * scipy.special.erfc(-x.astype(np.float64) / math.sqrt(2))
    np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), want, atol=2e-6)
    grad = np.asarray(jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x)))
    xs = x.astype(np.float64)
    want_grad = (0.5 * scipy.special.erfc(-xs / math.sqrt(2))
                 + xs * np.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi))
    np.testing.assert_allclose(grad, want_grad, atol=2e-6)


def _reference_attention(q, k, v, mask):
    """Softmax attention in float64 numpy."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def test_attention_matches_softmax_attention_and_flax():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 8)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 1, 1, 7), bool)
    mask[1, ..., 4:] = False  # padding in the second example
    got = np.asarray(layers.dot_product_attention(q, k, v, mask=mask))
    np.testing.assert_allclose(got, _reference_attention(q, k, v, mask), atol=1e-5)
    flax_out = np.asarray(nn.dot_product_attention(q, k, v, mask=mask))
    np.testing.assert_allclose(got, flax_out, atol=1e-6)
    # Dropout on the weights: a different result, the same in expectation's scale.
    dropped = layers.dot_product_attention(q, k, v, mask=mask, dropout_rate=0.5,
                                           dropout_rng=jax.random.PRNGKey(0),
                                           deterministic=False)
    assert not np.allclose(np.asarray(dropped), got)
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        layers.dot_product_attention(q, k, v, dropout_rate=0.1, deterministic=False,
                                     dropout_rng=jax.random.PRNGKey(0), broadcast_dropout=True)


def _run(code: str, env_extra: dict | None = None) -> str:
    import os
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


_FAULTS = """
    import ctypes, resource
    from surm import allocator
    tuned = allocator.configure()
    assert allocator.configure() == tuned  # once per process
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 256 << 20  # a step's scratch buffer: malloc'ed, written, freed, asked for again

    def step():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    print(tuned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
def test_allocator_keeps_large_blocks_mapped_between_steps():
    tuned, faults = _run(_FAULTS).split()
    assert tuned == "True"
    # 256 MiB is 65,536 pages: freshly mapped every time without the settings.
    assert int(faults) < 2000, faults
    default_tuned, default_faults = _run(_FAULTS, {"SURM_MALLOC": "default"}).split()
    assert default_tuned == "False" and int(default_faults) > 60000, default_faults
