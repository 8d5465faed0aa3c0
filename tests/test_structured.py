"""The contract of surm.structured, checked against oracles written from scipy/numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from surm import structured
from surm.structured import fft

SHAPES = [(64, 64), (48, 80), (80, 48), (63, 63), (67, 67)]
# (family, hyper-parameters): every family in its default form, plus the optional forms.
VARIANTS = [(name, {}) for name in structured.FAMILIES] + [
    ("circulant", {"form": "hadamard"}),
    ("skew_circulant", {"form": "hadamard"}),
    ("symmetric_toeplitz", {"form": "product"}),
    ("kronecker", {"rank": 2}),
    ("ldr", {"rank": 3}),
    ("lowrank", {"rank": 3}),
]
CASES = [(name, hp, shape) for name, hp in VARIANTS for shape in SHAPES
         if not (name == "kronecker" and shape == (67, 67))]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in hp.items())}-{a}x{b}" for n, hp, (a, b) in CASES]
# Gradients on the shapes that exercise padding and truncation (rectangles, an odd size).
GRAD_CASES = [c for c in CASES if c[2] in ((48, 80), (80, 48), (63, 63))]
GRAD_IDS = [i for i, c in zip(IDS, CASES) if c in GRAD_CASES]


def random_params(name, hp, shape, seed=0):
    return structured.get(name).init(jax.random.PRNGKey(seed), *shape, init="random", std=1.0,
                                     **hp)


def skew(c):
    """The column-convention skew-circulant: the circulant with its upper triangle negated."""
    C = scipy.linalg.circulant(c)
    return np.tril(C) - np.triu(C, 1)


def oracle_dense(p):
    """The (d_in, d_out) matrix built from scipy.linalg / numpy, independently of surm."""
    a = {k: np.asarray(v, np.float64) for k, v in p.arrays.items()}
    d_in, d_out, hp = p.d_in, p.d_out, p.hparams
    if p.family in ("circulant", "skew_circulant"):
        c = a["a"] * a["b"] if hp["form"] == "hadamard" else a["c"]
        C = scipy.linalg.circulant(c) if p.family == "circulant" else skew(c)
        return C.T[:d_in, :d_out]
    if p.family == "toeplitz":
        t = a["t"]
        return scipy.linalg.toeplitz(t[d_in - 1::-1], t[d_in - 1:])
    if p.family == "symmetric_toeplitz":
        if hp["form"] == "product":
            return scipy.linalg.toeplitz(a["a"]) @ scipy.linalg.toeplitz(a["b"])[:d_in, :d_out]
        return scipy.linalg.toeplitz(a["v"])[:d_in, :d_out]
    if p.family == "kronecker":
        return sum(np.kron(A, B) for A, B in zip(a["A"], a["B"]))
    if p.family == "ldr":
        W = sum(scipy.linalg.circulant(g) @ skew(h) for g, h in zip(a["g"], a["h"]))
        return W.T[:d_in, :d_out]
    if p.family == "block_circulant":
        c = a["c"]
        return np.block([[scipy.linalg.circulant(c[i, j]).T for j in range(c.shape[1])]
                         for i in range(c.shape[0])])
    if p.family == "lowrank":
        return a["A"] @ a["B"]
    if p.family == "dense":
        return a["W"]
    raise AssertionError(p.family)


def test_families_named_by_the_contract():
    assert set(structured.FAMILIES) == {"circulant", "skew_circulant", "toeplitz",
                                        "symmetric_toeplitz", "kronecker", "ldr",
                                        "block_circulant", "lowrank", "dense"}


@pytest.mark.parametrize("name,hp,shape", CASES, ids=IDS)
def test_apply_equals_dense_and_oracle(name, hp, shape):
    fam = structured.get(name)
    p = random_params(name, hp, shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, shape[0]))
    M = fam.to_dense(p)
    assert M.shape == shape and M.dtype == jnp.float32
    ref = oracle_dense(p)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(M, ref, atol=1e-5 * scale, rtol=0)
    y = fam.apply(p, x)
    assert y.shape == (3, 5, shape[1]) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ ref,
                               atol=1e-4 * scale * np.sqrt(shape[0]), rtol=0)


@pytest.mark.parametrize("name,hp,shape", CASES, ids=IDS)
def test_zero_init_is_zero_with_nonzero_gradient_and_counted(name, hp, shape):
    fam = structured.get(name)
    p = fam.init(jax.random.PRNGKey(0), *shape, **hp)
    assert fam.num_params(*shape, **hp) == sum(leaf.size for leaf in jax.tree.leaves(p))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, shape[0]))
    # compiled, not op by op: exact zeros either way
    assert np.all(np.asarray(jax.jit(fam.to_dense)(p)) == 0)
    assert np.all(np.asarray(jax.jit(fam.apply)(p, x)) == 0)
    w = jax.random.normal(jax.random.PRNGKey(2), (4, shape[1]))
    grads = jax.jit(jax.grad(lambda q: jnp.sum(fam.apply(q, x) * w)))(p)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.parametrize("name,hp,shape", GRAD_CASES, ids=GRAD_IDS)
def test_gradients_match_the_dense_product(name, hp, shape):
    fam = structured.get(name)
    p = random_params(name, hp, shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, shape[0]))
    w = jax.random.normal(jax.random.PRNGKey(2), (6, shape[1]))

    def fast(q, x):
        return jnp.sum(fam.apply(q, x) * w)

    def dense(q, x):
        return jnp.sum((x @ fam.to_dense(q)) * w)

    gp, gx = jax.jit(jax.grad(fast, argnums=(0, 1)))(p, x)
    rp, rx = jax.grad(dense, argnums=(0, 1))(p, x)
    np.testing.assert_allclose(gx, rx, rtol=2e-4, atol=2e-4 * np.abs(rx).max())
    for g, r in zip(jax.tree.leaves(gp), jax.tree.leaves(rp)):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-4 * np.abs(r).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", structured.FAMILIES)
def test_half_precision_inputs(name, dtype):
    fam = structured.get(name)
    p = random_params(name, {}, (48, 80))
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 48))
    y = jax.jit(fam.apply)(p, x.astype(dtype))
    assert y.dtype == dtype
    ref = x @ oracle_dense(p)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0,
                               atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("name", structured.FAMILIES)
def test_vmap_over_params_and_inputs(name):
    fam = structured.get(name)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    ps = jax.vmap(lambda k: fam.init(k, 48, 80, init="random", std=1.0))(keys)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 48))
    ys = jax.vmap(fam.apply)(ps, xs)
    for i in range(2):
        p = jax.tree.map(lambda a: a[i], ps)
        np.testing.assert_allclose(ys[i], xs[i] @ oracle_dense(p), rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(ys).max()))


# --- best fits -------------------------------------------------------------------------------
FIT_CASES = [c for c in CASES if not (c[0] in ("ldr", "symmetric_toeplitz")
                                      and c[1].get("rank", 1) > 1 or c[1].get("form") == "product")]


@pytest.mark.parametrize("name,hp,shape", FIT_CASES, ids=[
    i for i, c in zip(IDS, CASES) if c in FIT_CASES])
def test_fit_recovers_a_member_of_the_family(name, hp, shape):
    fam = structured.get(name)
    p = random_params(name, hp, shape, seed=3)
    M = fam.to_dense(p)
    q = fam.fit(M, **hp, steps=3000, lr=3e-2)
    err = float(jnp.linalg.norm(fam.to_dense(q) - M) / jnp.linalg.norm(M))
    assert err < (2e-2 if name == "ldr" else 1e-4), err


LINEAR = ["circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "block_circulant"]


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (33, 33)])
def test_linear_fit_is_the_least_squares_projection(name, shape):
    """Oracle: numpy lstsq over the family's span (columns = to_dense of unit parameters)."""
    fam = structured.get(name)
    p0 = fam.init(jax.random.PRNGKey(0), *shape)
    flat, unravel = jax.flatten_util.ravel_pytree(p0)
    basis = np.stack([np.asarray(fam.to_dense(unravel(e))).ravel()
                      for e in np.eye(flat.size, dtype=np.float32)], axis=1)
    M = np.random.default_rng(0).standard_normal(shape)
    coef, *_ = np.linalg.lstsq(basis, M.ravel(), rcond=None)
    best = basis @ coef
    got = np.asarray(fam.to_dense(fam.fit(M))).ravel()
    np.testing.assert_allclose(got, best, atol=1e-5)


def test_lowrank_and_kronecker_fits_are_optimal():
    M = np.random.default_rng(1).standard_normal((36, 48))
    s = np.linalg.svd(M, compute_uv=False)
    lr = structured.get("lowrank")
    err = np.linalg.norm(np.asarray(lr.to_dense(lr.fit(M, rank=5))) - M)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[5:] ** 2)), rtol=1e-4)  # Eckart-Young
    kr = structured.get("kronecker")
    q = kr.fit(M, factors=(6, 8))
    err = np.linalg.norm(np.asarray(kr.to_dense(q)) - M)
    # Any perturbation of the optimum is worse.
    rng = np.random.default_rng(2)
    for _ in range(5):
        A = q["A"] + 1e-2 * rng.standard_normal(q["A"].shape)
        B = q["B"] + 1e-2 * rng.standard_normal(q["B"].shape)
        worse = np.linalg.norm(np.kron(A[0], B[0]) - M)
        assert worse > err


def test_ldr_has_low_displacement_rank():
    n, r = 32, 2
    p = random_params("ldr", {"rank": r}, (n, n))
    W = np.asarray(structured.get("ldr").to_dense(p), np.float64).T  # column convention
    Z1 = np.roll(np.eye(n), 1, axis=0)                                # unit circulant shift
    Zm1 = Z1.copy()
    Zm1[0, -1] = -1.0
    assert np.linalg.matrix_rank(Z1 @ W - W @ Zm1, tol=1e-6 * np.abs(W).max()) <= 2 * r


def test_ldr_fit_is_at_least_as_good_as_circulant():
    M = np.random.default_rng(0).standard_normal((40, 40))
    circ = structured.get("circulant")
    ldr = structured.get("ldr")
    e_circ = np.linalg.norm(np.asarray(circ.to_dense(circ.fit(M))) - M)
    e_ldr = np.linalg.norm(np.asarray(ldr.to_dense(ldr.fit(M, rank=2, steps=300))) - M)
    assert e_ldr < e_circ


# --- the FFT primitive -----------------------------------------------------------------------
def test_custom_vjp_matches_automatic_differentiation():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 40))
    k = jax.random.normal(jax.random.PRNGKey(1), (64,))
    w = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 50))
    got = jax.grad(lambda x, k: jnp.sum(fft.conv(x, k, 50) * w), argnums=(0, 1))(x, k)
    ref = jax.grad(lambda x, k: jnp.sum(fft.conv_reference(x, k, 50) * w), argnums=(0, 1))(x, k)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_fast_length():
    assert [fft.fast_length(n) for n in (1, 7, 127, 128, 129, 1535)] == [1, 8, 128, 128, 135, 1536]


# --- errors ----------------------------------------------------------------------------------
def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="known families: circulant, skew_circulant"):
        structured.get("circulent")


@pytest.mark.parametrize("name,shape,hp,match", [
    ("kronecker", (67, 64), {}, "d_in = 67 has no split"),
    ("kronecker", (64, 64), {"factors": (5, 8)}, "must divide"),
    ("block_circulant", (64, 48), {"block_size": 32}, r"sizes that do: \[1, 2, 4, 8, 16\]"),
    ("block_circulant", (67, 64), {}, "no block size > 1 divides"),
    ("lowrank", (8, 16), {"rank": 9}, "exceeds min"),
    ("circulant", (8, 8), {"rank": 2}, "unknown hyper-parameter"),
    ("circulant", (8, 8), {"form": "outer"}, "form must be one of"),
    ("ldr", (0, 8), {}, "d_in must be a positive int"),
    ("ldr", (8, 8), {"rank": 0}, "rank must be a positive int"),
])
def test_bad_shapes_and_hparams_raise_helpfully(name, shape, hp, match):
    fam = structured.get(name)
    with pytest.raises(ValueError, match=match):
        fam.init(jax.random.PRNGKey(0), *shape, **hp)
    with pytest.raises(ValueError, match=match):
        fam.num_params(*shape, **hp)


def test_bad_inputs_raise():
    circ = structured.get("circulant")
    p = circ.init(jax.random.PRNGKey(0), 8, 12)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 8\)"):
        circ.apply(p, jnp.ones((2, 12)))
    with pytest.raises(ValueError, match="use structured.get"):
        structured.get("toeplitz").apply(p, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="init must be one of"):
        circ.init(jax.random.PRNGKey(0), 8, 8, init="ones")


def test_kronecker_default_factors_are_small_and_square():
    kr = structured.get("kronecker")
    assert kr.hparams(256, 256)["factors"] == (16, 16)
    assert kr.hparams(768, 768)["factors"] in ((24, 32), (32, 24))
    # The default split can represent the identity (a Kronecker product of identities).
    np.testing.assert_allclose(kr.to_dense(kr.fit(np.eye(256))), np.eye(256), atol=1e-5)
