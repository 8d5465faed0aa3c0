"""Adapter folders record the base model they were trained on and refuse another."""
import json

import jax
import numpy as np
import pytest

from surm import peft
from surm.peft import io as peft_io
from surm.peft import tree
from test_peft import randomize, tiny_bert

SPEC = peft.PeftSpec.create(structure="block_circulant", hparams={"block_size": 8}, targets="qv")


def with_leaf(params, path, change):
    flat = tree.flatten(params)
    flat[path] = change(np.asarray(flat[path]))
    return tree.unflatten(flat)


def test_a_mismatched_base_is_refused(tmp_path):
    _, base, _ = tiny_bert()
    trainable = randomize(peft.init(base, SPEC, jax.random.PRNGKey(0))[0])
    peft_io.save(tmp_path, trainable, SPEC, base=peft_io.base_identity(base, SPEC, "bert:tiny"))
    recorded = json.loads((tmp_path / peft_io.BASE).read_text())
    assert recorded == {"name": "bert:tiny", "sha256": peft_io.base_hash(base, SPEC)}
    assert len(recorded["sha256"]) == 16

    # The head trains in full: another head is the same base (it comes from the folder).
    other_head = with_leaf(base, "classifier/bias", lambda v: v + 1)
    loaded, _ = peft_io.load(tmp_path, other_head)
    np.testing.assert_array_equal(loaded["base"]["classifier"]["bias"],
                                  trainable["base"]["classifier"]["bias"])

    def bump(v):
        v = np.array(v)
        v[0, 0] += 1e-3
        return v

    one_weight = with_leaf(base, "encoder/layer/1/output/dense/kernel", bump)
    with pytest.raises(ValueError, match=rf"bert:tiny \(frozen weights sha256 "
                                         rf"{recorded['sha256']}\).*check_base=False"):
        peft_io.load(tmp_path, one_weight)
    loaded, _ = peft_io.load(tmp_path, one_weight, check_base=False)
    np.testing.assert_array_equal(loaded["adapters"]["encoder"]["layer"]["0"]["attention"]
                                  ["self"]["query"]["S"]["c"],
                                  trainable["adapters"]["encoder"]["layer"]["0"]["attention"]
                                  ["self"]["query"]["S"]["c"])


def test_the_hash_sees_names_dtypes_and_shapes():
    _, base, _ = tiny_bert()
    h = peft_io.base_hash(base, SPEC)
    assert peft_io.base_hash(jax.tree.map(np.asarray, base), SPEC) == h  # host or device
    flat = tree.flatten(base)
    renamed = dict(flat)
    renamed["pooler/dense/kernel_"] = renamed.pop("pooler/dense/kernel")
    assert peft_io.base_hash(tree.unflatten(renamed), SPEC) != h
    as_f16 = {**flat, "pooler/dense/bias": np.asarray(flat["pooler/dense/bias"], np.float16)}
    assert peft_io.base_hash(tree.unflatten(as_f16), SPEC) != h
    v = np.asarray(flat["encoder/layer/0/intermediate/dense/kernel"])  # (48, 96)
    reshaped = {**flat, "encoder/layer/0/intermediate/dense/kernel": v.reshape(96, 48)}
    assert peft_io.base_hash(tree.unflatten(reshaped), SPEC) != h


def test_old_folders_and_views_load(tmp_path):
    _, base, _ = tiny_bert()
    trainable = peft.init(base, SPEC, jax.random.PRNGKey(0))[0]
    kernel = np.arange(48 * 3, dtype=np.float32).reshape(3, 48).T  # a transposed view
    trainable["base"]["classifier"]["kernel"] = kernel
    peft_io.save(tmp_path, trainable, SPEC, base=None)  # no identity: nothing to check
    assert not (tmp_path / peft_io.BASE).exists()
    loaded, _ = peft_io.load(tmp_path, with_leaf(base, "pooler/dense/bias", lambda v: v + 1))
    np.testing.assert_array_equal(loaded["base"]["classifier"]["kernel"], kernel)


def test_a_damaged_or_cut_adapters_file_is_one_error_naming_it(tmp_path):
    """The tensors' sha256 rides in the file's metadata: a flipped bit in a tensor is found at
    load; a cut or garbage file, or a broken spec, is a ValueError naming the file."""
    _, base, _ = tiny_bert()
    trainable = randomize(peft.init(base, SPEC, jax.random.PRNGKey(0))[0])
    peft_io.save(tmp_path, trainable, SPEC, base=None)
    weights = tmp_path / peft_io.WEIGHTS
    good = weights.read_bytes()
    peft_io.load(tmp_path, base)  # intact: loads
    flipped = bytearray(good)
    flipped[-5] ^= 0x10  # a bit of the last tensor's data
    for damaged, message in ((bytes(flipped), "does not match the checksum"),
                             (good[:len(good) // 2], "not a readable safetensors file"),
                             (b"\x00" * 64, "not a readable safetensors file")):
        weights.write_bytes(damaged)
        with pytest.raises(ValueError, match=message) as e:
            peft_io.load(tmp_path, base)
        assert str(weights) in str(e.value) and "\n" not in str(e.value)
    weights.write_bytes(good)
    (tmp_path / peft_io.SPEC).write_text("{not json")
    with pytest.raises(ValueError, match=r"peft_spec.json is not a PEFT spec"):
        peft_io.load(tmp_path, base)
