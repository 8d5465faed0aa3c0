"""Surgery: inject, forward, merge/unmerge, gradients, counts, rules, adapter files."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from surm import peft, structured
from surm.models import bert, vit
from surm.peft import io as peft_io
from surm.peft import tree


@functools.lru_cache(maxsize=None)
def tiny_vit():
    cfg = vit.ViTConfig(num_classes=5, patch_size=8, image_size=32, width=48, depth=2,
                        num_heads=4, mlp_dim=96)
    model = vit.ViT(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    # A non-zero head so that logits depend on the adapters.
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
    return model, params, (x,)


@functools.lru_cache(maxsize=None)
def tiny_bert():
    cfg = bert.BertConfig(vocab_size=60, hidden_size=48, num_layers=2, num_heads=4,
                          intermediate_size=96, max_position_embeddings=16, num_labels=3,
                          pooling="pooler", hidden_dropout=0.0, attention_dropout=0.0)
    model = bert.BERT(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 60)
    mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)
    params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
    params["classifier"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2),
                                                       params["classifier"]["kernel"].shape)
    return model, params, (ids, mask)


MODELS = {"vit": tiny_vit, "bert": tiny_bert}
# Families that take 48 x 48, 48 x 96 and 96 x 48 with their default hyper-parameters.
FAMILY_HP = {name: {} for name in structured.FAMILIES}
FAMILY_HP["lowrank"] = {"rank": 4}


def randomize(trainable, seed=7):
    leaves, treedef = jax.tree.flatten(trainable["adapters"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [0.05 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
    return {**trainable, "adapters": jax.tree.unflatten(treedef, noisy)}


def logits(model_name, trainable, frozen, spec, **kw):
    model, _, inputs = MODELS[model_name]()
    return peft.apply(model, frozen, trainable, spec, *inputs, **kw)


def base_logits(model_name):
    model, params, inputs = MODELS[model_name]()
    return model.apply({"params": params}, *inputs)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("mode", ["lora", "adapter"])
@pytest.mark.parametrize("family", structured.FAMILIES)
def test_zero_init_adapters_leave_logits_unchanged(model_name, mode, family):
    _, params, _ = MODELS[model_name]()
    spec = peft.PeftSpec.create(method=mode, structure=family, hparams=FAMILY_HP[family],
                                targets="all-linear" if mode == "lora" else None)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(3))
    assert trainable["adapters"], "no adapters injected"
    np.testing.assert_array_equal(logits(model_name, trainable, frozen, spec),
                                  base_logits(model_name))


@pytest.mark.parametrize("model_name", MODELS)
def test_houlsby_starts_as_identity(model_name):
    _, params, _ = MODELS[model_name]()
    spec = peft.PeftSpec.create(method="houlsby", hparams={"rank": 4})
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(logits(model_name, trainable, frozen, spec),
                                  base_logits(model_name))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("family", structured.FAMILIES)
def test_merged_equals_unmerged_and_unmerge_restores(model_name, family):
    _, params, _ = MODELS[model_name]()
    spec = peft.PeftSpec.create(structure=family, hparams=FAMILY_HP[family], targets="all-linear",
                                scale=0.7)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(3))
    trainable = randomize(trainable)
    unmerged = logits(model_name, trainable, frozen, spec)
    assert float(jnp.abs(unmerged - base_logits(model_name)).max()) > 1e-3  # adapters matter
    full = peft.full_params(frozen, trainable)
    merged = peft.merge(full, trainable["adapters"], spec)
    model, _, inputs = MODELS[model_name]()
    np.testing.assert_allclose(model.apply({"params": merged}, *inputs), unmerged, atol=1e-4)
    restored = peft.unmerge(merged, trainable["adapters"], spec)
    for (p, a), (q, b) in zip(tree.flatten(restored).items(), tree.flatten(full).items()):
        assert p == q
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("model_name,family", [
    ("vit", "circulant"), ("bert", "toeplitz"), ("bert", "kronecker"), ("vit", "ldr"),
    ("bert", "lowrank")])
def test_folded_lora_paths_match_the_structured_path(model_name, family):
    """Folding the update into the kernel (its gradient by the dense matmul, or by the family's
    product: 'mixed') gives the same logits and the same gradients (of the adapters, their
    learned scale and the head) as the fast product on the activations."""
    model, params, inputs = MODELS[model_name]()
    spec = peft.PeftSpec.create(structure=family, hparams=FAMILY_HP[family], targets="all-linear",
                                scale=0.7, learn_scale=True)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(3))
    trainable = randomize(trainable)  # every adapter leaf (the scales too) ~ N(0, 0.05^2)
    trainable["adapters"] = jax.tree.map(lambda a: 6 * a, trainable["adapters"])

    def loss(tr, path):
        out = peft.apply(model, frozen, tr, spec, *inputs, train=True, lora_path=path)
        return jnp.sum(jnp.sin(out))

    a, ga = jax.value_and_grad(loss)(trainable, "structured")
    assert float(jnp.abs(logits(model_name, trainable, frozen, spec) - base_logits(
        model_name)).max()) > 1e-2  # the adapters matter
    flat_a = tree.flatten(ga)
    for path in ("dense", "mixed"):
        b, gb = jax.value_and_grad(loss)(trainable, path)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        flat_b = tree.flatten(gb)
        assert flat_a.keys() == flat_b.keys()
        for leaf in flat_a:
            scale = float(jnp.abs(flat_a[leaf]).max()) + 1e-6
            # float32 FFTs against float32 matmuls: a learned scale's gradient sums every output
            # with cancellation (1e-3 apart here; 1e-5 with float64 matmuls, a wrong fold is O(1))
            np.testing.assert_allclose(flat_b[leaf] / scale, flat_a[leaf] / scale, atol=5e-3,
                                       err_msg=f"{path}: {leaf}")


def test_lora_path_choice_and_errors(monkeypatch):
    def S(family, d, **hp):
        return structured.get(family).init(jax.random.PRNGKey(0), d, d, **hp)

    circ, toep = (peft.PeftSpec.create(structure=f) for f in ("circulant", "toeplitz"))
    assert jax.default_backend() == "cpu"

    def auto(spec, family, d, train=True):
        return peft.lora_path_for(spec, S(family, d), train=train)

    # auto on the CPU, in training: the weight-gradient matmul pays at small widths, the
    # family's product at large ones, and a Toeplitz product (FFTs of twice the length) stays
    # dearer than the matmul to larger widths
    assert auto(circ, "circulant", 64) == "dense"
    assert auto(circ, "circulant", 1024) == "mixed"
    assert auto(toep, "toeplitz", 256) == "dense"
    assert auto(toep, "toeplitz", 1024) == "mixed"
    # the rule is the documented one: 2 d_in d_out against rate x the product's flops per row
    for family, spec in (("circulant", circ), ("toeplitz", toep)):
        for d in (96, 192, 384, 768):
            cheaper = 2 * d * d <= peft.MATMUL_OVER_FFT_RATE["cpu"] * peft.flops_per_row(
                S(family, d))
            assert auto(spec, family, d) == ("dense" if cheaper else "mixed")
    monkeypatch.setitem(peft.MATMUL_OVER_FFT_RATE, "cpu", 1e9)  # matmuls free: always dense
    assert auto(circ, "circulant", 2048) == "dense"
    monkeypatch.setitem(peft.MATMUL_OVER_FFT_RATE, "cpu", 0.0)  # matmuls dear: never
    assert auto(circ, "circulant", 64) == "mixed"
    # no gradient: a mergeable update is folded whatever the rates
    assert auto(circ, "circulant", 2048, train=False) == "dense"
    # explicit paths are taken as asked
    for path in ("structured", "dense", "mixed"):
        assert peft.lora_path_for(circ, S("circulant", 64), path, train=True) == path
    monkeypatch.setitem(peft.MATMUL_OVER_FFT_RATE, "cpu", 1e9)
    lora = peft.PeftSpec.create(structure="lowrank", hparams={"rank": 2})
    assert peft.lora_path_for(lora, S("lowrank", 64, rank=2), train=True) == "structured"
    with pytest.raises(ValueError, match="is not one of"):
        peft.check_lora_path(circ, "fft")
    dropped = peft.PeftSpec.create(structure="circulant", dropout=0.1)
    assert peft.lora_path_for(dropped, S("circulant", 64), train=True) == "structured"
    assert peft.lora_path_for(dropped, S("circulant", 64), "dense") == "dense"  # eval: no dropout
    for path in ("dense", "mixed"):
        with pytest.raises(ValueError, match="adapter dropout"):
            peft.check_lora_path(dropped, path, train=True)
    for spec in (peft.PeftSpec.create(method="adapter", structure="circulant"),
                 peft.PeftSpec.create(method="bitfit")):
        peft.check_lora_path(spec, "auto", train=True)
        assert peft.lora_path_for(spec, None, train=True) == "structured"
        for path in ("dense", "mixed"):
            with pytest.raises(ValueError, match="no weight update to fold"):
                peft.check_lora_path(spec, path)


def test_auto_lora_path_folds_per_target(monkeypatch):
    """auto decides per matrix: between the square and the rectangular targets' cost ratios
    (1.56 and 1.32: a 48 x 96 circulant takes FFTs of length 96 for twice the entries), the
    rectangles take the dense weight gradient and the squares the mixed one, and the logits and
    gradients are those of the structured path."""
    model, params, inputs = tiny_bert()  # 48 -> 48 attention, 48 <-> 96 MLP
    spec = peft.PeftSpec.create(structure="circulant", targets="all-linear", scale=0.7)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(3))
    trainable = randomize(trainable)
    nodes = tree.flatten(trainable["adapters"], stop=lambda d: "S" in d)
    widths = {p: n["S"].d_in * n["S"].d_out for p, n in nodes.items()}
    monkeypatch.setitem(peft.MATMUL_OVER_FFT_RATE, "cpu", 1.44)
    choice = {p: peft.lora_path_for(spec, n["S"], train=True) for p, n in nodes.items()}
    assert {choice[p] for p in nodes if widths[p] == 48 * 48} == {"mixed"}
    assert {choice[p] for p in nodes if widths[p] == 48 * 96} == {"dense"}

    def loss(tr, path):
        out = peft.apply(model, frozen, tr, spec, *inputs, train=True, lora_path=path)
        return jnp.sum(jnp.sin(out))

    ref, ref_grad = jax.value_and_grad(loss)(trainable, "structured")
    got, grad = jax.value_and_grad(loss)(trainable, "auto")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_grad), jax.tree.leaves(grad)):
        np.testing.assert_allclose(b, a, atol=1e-4 * (float(jnp.abs(a).max()) + 1e-6))


def test_a_lora_path_plan_is_made_before_tracing_and_apply_follows_it(monkeypatch):
    """The trainer's plan: decided once, eagerly (auto compiles each product to count its
    flops); a traced apply given the plan decides nothing."""
    from surm.peft import surgery
    model, params, inputs = tiny_bert()
    spec = peft.PeftSpec.create(structure="circulant", targets="all-linear")
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    nodes = tree.flatten(trainable["adapters"], stop=lambda d: "S" in d)
    plan = peft.plan_lora_paths(spec, trainable, "auto", train=True)
    assert set(plan) == set(nodes) and set(plan.values()) <= {"dense", "mixed"}
    assert set(peft.plan_lora_paths(spec, trainable, "auto").values()) == {"dense"}  # eval

    def refuse(*args, **kwargs):
        raise AssertionError("a lora path decided while tracing")
    monkeypatch.setattr(surgery, "lora_path_for", refuse)
    monkeypatch.setattr(surgery, "flops_per_row", refuse)
    jax.jit(lambda tr: peft.apply(model, frozen, tr, spec, *inputs, train=True,
                                  lora_path=plan)).lower(trainable)
    with pytest.raises(ValueError, match="does not fit these adapters"):
        peft.apply(model, frozen, trainable, spec, *inputs, lora_path=dict(list(plan.items())[:1]))


def test_learned_scale_and_adapter_mode_merge_errors():
    _, params, _ = tiny_bert()
    spec = peft.PeftSpec.create(structure="circulant", learn_scale=True, scale=0.5)
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(0))
    scales = [n["scale"] for n in tree.flatten(trainable["adapters"],
                                               stop=lambda d: "S" in d).values()]
    assert len(scales) == 4 and all(float(s) == 0.5 for s in scales)
    spec = peft.PeftSpec.create(method="adapter", structure="circulant")
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="adapter mode applies a non-linearity"):
        peft.merge(params, trainable["adapters"], spec)


@pytest.mark.parametrize("method,extra,expect_base", [
    ("lora", {"structure": "circulant"}, {"classifier"}),
    ("bitfit", {}, {"classifier", "bias"}),
    ("probe", {}, {"classifier"}),
    ("lora", {"structure": "circulant", "train_layernorm": True}, {"classifier", "LayerNorm"}),
])
def test_gradients_only_for_the_trainable_tree(method, extra, expect_base):
    model, params, inputs = tiny_bert()
    spec = peft.PeftSpec.create(method=method, **extra)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    trained = set(tree.flatten(trainable["base"]))
    assert all(any(word in p for word in expect_base) for p in trained)
    assert not trained & set(tree.flatten(frozen)), "a leaf is both frozen and trainable"
    n_base = sum(np.size(v) for v in tree.flatten(params).values())
    assert sum(np.size(v) for v in tree.flatten(frozen).values()) + sum(
        np.size(v) for v in tree.flatten(trainable["base"]).values()) == n_base

    def loss(tr):
        return jnp.sum(peft.apply(model, frozen, tr, spec, *inputs) ** 2)

    grads = jax.grad(loss)(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for path, g in tree.flatten(grads["adapters"]).items():
        if path.endswith("S/c"):  # zero-init circulant still receives a gradient
            assert float(jnp.abs(g).sum()) > 0
    opt_state = optax.adamw(1e-3).init(trainable)
    n_trainable = sum(np.size(v) for v in jax.tree.leaves(trainable))
    n_state = sum(np.size(v) for v in jax.tree.leaves(opt_state))
    assert n_state == 2 * n_trainable + 1  # mu, nu and the step count: nothing for frozen


def bert_base_abstract():
    cfg = bert.BertConfig(num_labels=2)
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: bert.BERT(cfg).init(jax.random.PRNGKey(0), ids)["params"])


@pytest.mark.parametrize("family,hp,per_matrix", [
    ("circulant", {}, 768), ("lowrank", {"rank": 1}, 1536), ("lowrank", {"rank": 4}, 6144),
    ("circulant", {"form": "hadamard"}, 1536), ("symmetric_toeplitz", {"form": "product"}, 1536),
    ("ldr", {"rank": 2}, 3072),
])
def test_counts_match_the_budget_table(family, hp, per_matrix):
    """SURM_NOTES: q+v in 12 layers of a 768 model: circulant 18,432; LoRA r: 36,864 r."""
    abstract = bert_base_abstract()
    spec = peft.PeftSpec.create(structure=family, hparams=hp)
    adapters = jax.eval_shape(lambda: peft.inject(abstract, spec, jax.random.PRNGKey(0)))
    n = sum(np.prod(l.shape) for l in jax.tree.leaves(adapters))
    assert n == 24 * per_matrix
    assert len(peft.targets(abstract, spec)) == 24


def test_circulant_adapters_on_bert_base_count():
    """24 Houlsby-placed circulant adapters (a, b, bias) in BERT-base: 55,296 with the hadamard
    form; one vector plus bias: 36,864."""
    abstract = bert_base_abstract()
    for hp, expected in (({"form": "hadamard"}, 55_296), ({}, 36_864)):
        spec = peft.PeftSpec.create(method="adapter", structure="circulant", hparams=hp)
        adapters = jax.eval_shape(lambda: peft.inject(abstract, spec, jax.random.PRNGKey(0)))
        assert sum(np.prod(l.shape) for l in jax.tree.leaves(adapters)) == expected


def test_presets_and_rules_select_the_right_paths():
    _, vparams, _ = tiny_vit()
    _, bparams, _ = tiny_bert()
    vlin, blin = peft.linear_modules(vparams), peft.linear_modules(bparams)
    assert "embedding" not in vlin  # the patch convolution is not a linear module
    assert vlin["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out"] == (48, 48)
    qv = peft.match_targets(["qv"], blin)
    assert qv == [f"encoder/layer/{i}/attention/self/{m}" for i in range(2)
                  for m in ("query", "value")]
    mlp = peft.match_targets(["mlp"], blin)
    assert len(mlp) == 4 and not any("attention" in p for p in mlp)
    assert len(peft.match_targets(["all-linear"], vlin)) == 12
    assert peft.match_targets(["layer/1/attention/self/key"], blin) == [
        "encoder/layer/1/attention/self/key"]
    assert peft.match_targets([r"re:encoder/layer/0/.*/dense"], blin) == [
        "encoder/layer/0/attention/output/dense", "encoder/layer/0/intermediate/dense",
        "encoder/layer/0/output/dense"]


def test_rule_matching_nothing_lists_the_paths():
    _, params, _ = tiny_bert()
    spec = peft.PeftSpec.create(structure="circulant", targets="attention/self/qeury")
    with pytest.raises(ValueError, match=r"(?s)matches no linear module.*encoder/layer/0/attention/self/query"):
        peft.init(params, spec, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="always trains in full"):
        peft.init(params, peft.PeftSpec.create(targets="classifier"), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown peft structure 'circulent'"):
        peft.PeftSpec.create(structure="circulent")


def test_the_configs_words_are_read_at_the_boundary_only():
    """A spec speaks method and structure; the configs' family and mode are read by
    ``from_family`` (config arguments, files of older versions) and nowhere else."""
    with pytest.raises(ValueError, match="method='adapter', structure='toeplitz'"):
        peft.PeftSpec.create(family="toeplitz", mode="adapter")
    for family, mode, method, structure in (("circulant", None, "lora", "circulant"),
                                            ("lowrank", "adapter", "adapter", "lowrank"),
                                            ("houlsby", "adapter", "houlsby", None),
                                            ("linear_probe", None, "probe", None),
                                            ("full", None, "full", None)):
        assert peft.spec.from_family(family, mode) == (method, structure)
        back = peft.spec.to_family(method, structure)
        assert peft.spec.from_family(*back) == (method, structure)
    with pytest.raises(ValueError, match="houlsby is an adapter"):
        peft.spec.from_family("houlsby", "lora")
    old = {"family": "block_circulant", "mode": "adapter", "hparams": {"block_size": 8}}
    assert peft.spec.upgrade(old) == {"method": "adapter", "structure": "block_circulant",
                                      "hparams": {"block_size": 8}}
    assert peft.spec.upgrade({"method": "full", "structure": None})["method"] == "full"
    with pytest.raises(ValueError, match="not both"):
        peft.spec.upgrade({"family": "circulant", "method": "lora"})
    # an adapter folder of an older version (its spec in family and mode) still loads
    spec = peft.PeftSpec.create(method="adapter", structure="circulant", targets="qv")
    d = json.loads(spec.to_json())
    d["family"], d["mode"] = d.pop("structure"), d.pop("method")
    assert peft.PeftSpec.from_json(json.dumps(d)) == spec


def test_adapter_files_round_trip(tmp_path):
    model, params, inputs = tiny_bert()
    spec = peft.PeftSpec.create(structure="kronecker", hparams={"rank": 2}, targets="qkvo",
                                learn_scale=True)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    trainable = randomize(trainable)
    trainable["base"]["classifier"]["bias"] = trainable["base"]["classifier"]["bias"] + 0.3
    peft_io.save(tmp_path, trainable, spec, base=params)
    loaded, spec2 = peft_io.load(tmp_path, params)
    assert spec2 == spec
    _, frozen2 = peft.split(params, spec2)
    np.testing.assert_array_equal(peft.apply(model, frozen2, loaded, spec2, *inputs),
                                  peft.apply(model, frozen, trainable, spec, *inputs))
    other = peft.PeftSpec.create(structure="kronecker", hparams={"rank": 1}, targets="qkvo",
                                 learn_scale=True)
    peft_io.save(tmp_path / "r1", peft.init(params, other, jax.random.PRNGKey(0))[0], other,
                 base=None)
    (tmp_path / "r1" / "peft_spec.json").write_text(spec.to_json())
    with pytest.raises(ValueError, match="mis-shaped adapters/encoder/layer/0/attention/self/query/S/A"):
        peft_io.load(tmp_path / "r1", params)
    with pytest.raises(FileNotFoundError, match="adapters.safetensors"):
        peft_io.load(tmp_path / "nowhere", params)


def test_dropout_only_in_training():
    _, params, _ = tiny_bert()
    spec = peft.PeftSpec.create(structure="circulant", dropout=0.5)
    trainable, frozen = peft.init(params, spec, jax.random.PRNGKey(0))
    trainable = randomize(trainable)
    a = logits("bert", trainable, frozen, spec)
    np.testing.assert_array_equal(a, logits("bert", trainable, frozen, spec))
    b = logits("bert", trainable, frozen, spec, train=True, rng=jax.random.PRNGKey(1))
    assert float(jnp.abs(a - b).max()) > 1e-4
    with pytest.raises(ValueError, match="needs an rng"):
        logits("bert", trainable, frozen, spec, train=True)


def test_report_format():
    _, params, _ = tiny_bert()
    spec = peft.PeftSpec.create(structure="lowrank", hparams={"rank": 2})
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(0))
    counts = peft.count(params, trainable, spec)
    assert counts["adapter"] == 4 * 2 * (48 + 48)
    assert counts["trainable"] == counts["adapter"] + 48 * 3 + 3
    text = peft.format_report(counts)
    assert "encoder/layer/1/attention/self/value" in text and "trainable%" in text
    assert text.startswith("PEFT lora, lowrank rank=2: 4 targeted modules")
    # a mixed spec names each target's structure, not one for all
    mixed = peft.PeftSpec.create(structure="circulant", targets="qv",
                                 patterns={"value": {"structure": "lowrank", "rank": 2}})
    text = peft.format_report(peft.count(params, peft.init(params, mixed,
                                                           jax.random.PRNGKey(0))[0], mixed))
    assert text.splitlines()[0] == ("PEFT lora, circulant on 2, lowrank rank=2 on 2: "
                                    "4 targeted modules")
    assert "encoder/layer/0/attention/self/value  lowrank rank=2" in text


def test_the_everyday_surface_needs_no_extra_import_and_takes_comma_strings(tmp_path):
    """peft.save / peft.load and peft.io work after ``from surm import peft`` alone; every
    list-valued spec field takes "a,b" (train_extra="ln_f" used to train the modules 'l',
    'n', '_' and 'f'); the base is recorded unless opted out, and checked."""
    import subprocess
    import sys
    code = ("from surm import peft; assert callable(peft.save) and callable(peft.load) "
            "and callable(peft.io.save)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    spec = peft.PeftSpec.create(structure="circulant", train_extra="pooler/dense,classifier",
                                heads="classifier", targets="query,value")
    assert spec.train_extra == ("pooler/dense", "classifier") and spec.heads == ("classifier",)
    _, params, _ = tiny_bert()
    trainable, _ = peft.init(params, spec, jax.random.PRNGKey(0))
    assert "pooler" in trainable["base"]
    with pytest.raises(TypeError, match="pass base=base_params"):
        peft.save(tmp_path / "a", trainable, spec)
    peft.save(tmp_path / "a", trainable, spec, base=params)  # the tree: its identity recorded
    peft.load(tmp_path / "a", params)
    other = jax.tree.map(lambda v: v + 1, params)
    with pytest.raises(ValueError, match="frozen weights sha256"):
        peft.load(tmp_path / "a", other)
    peft.save(tmp_path / "b", trainable, spec, base=None)  # on purpose: nothing to check
    peft.load(tmp_path / "b", other)


def test_presets_take_each_registered_models_own_layer_names(monkeypatch):
    """The presets name roles; a model's registry entry says which of its layers play them
    (peft itself names no model), and one registered later joins the presets."""
    from surm import models
    from surm.peft import spec as spec_lib

    class Mine(models.ModelEntry):
        name, modality, input_keys = "presets_probe_model", "image", ("image",)
        target_names = {"q": ("attn/wq",), "v": ("attn/wv",), "mlp_out": ("ffn/out",)}

        def build(self, cfg, num_classes, rng):
            raise NotImplementedError

    rules = lambda preset: [p for _, p in spec_lib.expand_rules([preset])]  # noqa: E731
    matches = lambda preset, path: any(spec_lib.rule_matches(p, path)  # noqa: E731
                                       for p in rules(preset))
    assert not matches("qv", "block_0/attn/wq")
    monkeypatch.setitem(models.registry._ENTRIES, Mine.name, Mine())  # registered, then not
    assert matches("qv", "block_0/attn/wq") and matches("qv", "block_3/attn/wv")
    assert matches("houlsby", "block_0/ffn/out") and not matches("qv", "block_0/ffn/out")
    assert matches("qv", "encoder/layer/0/attention/self/query")  # BERT's, from its entry
    code = pathlib.Path(spec_lib.__file__).read_text()
    assert r"layer/\\d+/intermediate" not in code  # BERT's MLP names: its entry's


def test_disable_adapter_and_the_common_flax_names():
    """``apply(..., disable_adapter=True)`` is the base model's call; presets find the names
    Flax code commonly gives its layers (an ``attn`` module's query/value, an ``mlp``'s fc1)."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="query")(x) + nn.Dense(8, name="value")(x)
            return nn.Dense(4, name="head")(nn.Dense(8, name="fc2")(nn.relu(
                nn.Dense(16, name="fc1")(h))))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            attn_out = Block(name="attn")(x)
            return attn_out

    model = Model()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    qv = peft.PeftSpec.create(structure="circulant", targets="qv", init="random")
    assert sorted(peft.targets(params, qv)) == ["attn/query", "attn/value"]
    trainable, frozen = peft.init(params, qv, jax.random.PRNGKey(2))
    adapted = peft.apply(model, frozen, trainable, qv, x)
    base = model.apply({"params": peft.full_params(frozen, trainable)}, x)
    off = peft.apply(model, frozen, trainable, qv, x, disable_adapter=True)
    np.testing.assert_allclose(off, base, atol=1e-6)
    assert np.abs(np.asarray(adapted - base)).max() > 1e-4
