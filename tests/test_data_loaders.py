"""grain loaders: determinism, exact resume (also through orbax), process sharding, exact
evaluation with padding masks, low-resource subsets, worker processes."""
import numpy as np
import orbax.checkpoint as ocp
import grain
import pytest

from data_testing import minilm_tokenizer, prepared_dir
from surm import data
from surm.data import subsets

SOURCE = [{"id": i, "label": i % 3} for i in range(30)]


def tag(example, rng=None):
    """Keeps the id and draws one number, to see both order and augmentation randomness."""
    return {"id": np.int32(example["id"]),
            "draw": np.float32(rng.random() if rng is not None else -1)}


def _loader(source=SOURCE, **kwargs):
    options = dict(global_batch_size=4, seed=0, shard_index=0, shard_count=1)
    return data.make_train_loader(source, tag, **{**options, **kwargs})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["id"], y["id"])
        np.testing.assert_array_equal(x["draw"], y["draw"])


def test_same_seed_same_batches_other_seed_other_batches():
    _assert_same(_take(_loader(), 20), _take(_loader(), 20))
    first = [b["id"].tolist() for b in _take(_loader(), 7)]
    assert first != [b["id"].tolist() for b in _take(_loader(seed=1), 7)]


def test_epochs_are_shuffled_permutations():
    ids = np.concatenate([b["id"] for b in _take(_loader(global_batch_size=5), 12)])
    epochs = ids.reshape(2, 30)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
    assert epochs[0].tolist() != epochs[1].tolist() != list(range(30))


def test_restored_state_continues_with_the_next_batch():
    uninterrupted = _take(_loader(), 12)
    it = _loader()
    _take(it, 5)
    state = it.get_state()
    resumed = _loader()
    resumed.set_state(state)
    _assert_same(_take(resumed, 7), uninterrupted[5:])


def test_orbax_checkpoint_round_trip(tmp_path):
    uninterrupted = _take(_loader(), 9)
    it = _loader()
    _take(it, 4)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    resumed = _loader()
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(4, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same(_take(resumed, 5), uninterrupted[4:])


def test_process_shards_are_disjoint_and_cover_the_epoch():
    shards = []
    for index in range(3):
        it = _loader(global_batch_size=6, shard_index=index, shard_count=3, num_epochs=1)
        batches = list(it)
        assert all(b["id"].shape == (2,) for b in batches) and len(batches) == 5
        shards.append({int(i) for b in batches for i in b["id"]})
    assert sum(len(s) for s in shards) == 30
    assert set.union(*shards) == set(range(30))


def test_eval_batches_are_exact_with_a_padding_mask():
    source = SOURCE[:23]
    batches = list(data.make_eval_batches(source, tag, global_batch_size=4,
                                          shard_index=0, shard_count=1))
    assert [b["mask"].sum() for b in batches] == [4, 4, 4, 4, 4, 3]
    ids = np.concatenate([b["id"][b["mask"]] for b in batches])
    assert ids.tolist() == list(range(23))  # One pass, in order.
    positions = np.concatenate([b["index"][b["mask"]] for b in batches])
    assert positions.tolist() == ids.tolist()  # Each example's place in the split.
    assert (np.concatenate([b["draw"] for b in batches]) == -1).all()  # No rng in eval.


def test_eval_shards_have_equal_length_and_cover_the_split_once():
    source = SOURCE[:23]
    real, lengths = [], set()
    for index in range(3):
        batches = list(data.make_eval_batches(source, tag, global_batch_size=6,
                                              shard_index=index, shard_count=3))
        lengths.add(len(batches))
        real += [int(i) for b in batches for i in b["id"][b["mask"]]]
        for b in batches:  # a shard's examples know their place in the whole split
            assert b["index"][b["mask"]].tolist() == b["id"][b["mask"]].tolist()
    assert lengths == {4}  # ceil(ceil(23 / 3) / 2).
    assert sorted(real) == list(range(23))


def test_eval_dataset_can_be_iterated_again():
    batches = data.make_eval_batches(SOURCE, tag, global_batch_size=8, shard_index=0,
                                     shard_count=1)
    assert [b["id"].tolist() for b in batches] == [b["id"].tolist() for b in batches]


def test_bad_batch_sizes():
    with pytest.raises(ValueError, match="divisible"):
        _loader(global_batch_size=5, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        _loader(source=SOURCE[:3])
    with pytest.raises(ValueError, match="shard_index"):
        _loader(shard_index=2, shard_count=2)


def test_default_sharding_is_jax_process():
    batch = next(data.make_train_loader(SOURCE, tag, global_batch_size=4, seed=0))
    assert batch["id"].shape == (4,)  # One process: the whole global batch.


def test_low_resource_subsets():
    draws = {}
    for seed in range(4):
        few = subsets.k_per_class(SOURCE, 2, "label", num_classes=3, seed=seed)
        ids = [few[i]["id"] for i in range(len(few))]
        assert sorted(SOURCE[i]["label"] for i in ids) == [0, 0, 1, 1, 2, 2]
        assert ids == sorted(ids)  # the split's order
        again = subsets.k_per_class(SOURCE, 2, "label", num_classes=3, seed=seed)
        assert [again[i]["id"] for i in range(len(again))] == ids  # reproducible
        draws[seed] = tuple(ids)
    assert len(set(draws.values())) > 1  # each seed draws its own subset
    with pytest.raises(ValueError, match=r"2 examples per class asked, but the split has only "
                                         r"1 of class 1, 1 of class 2; ask for at most 1 "
                                         r"\(input.shots\)"):
        subsets.k_per_class(SOURCE[:4], 2, "label", num_classes=3, seed=0)
    assert [subsets.first(SOURCE, 3)[i]["id"] for i in range(3)] == [0, 1, 2]
    assert len(subsets.first(SOURCE, 10**6)) == len(SOURCE)
    part = subsets.first_fraction(SOURCE, 0.25)
    assert [part[i]["id"] for i in range(len(part))] == list(range(8))
    with pytest.raises(ValueError):
        subsets.first_fraction(SOURCE, 0)


def test_k_shot_on_a_real_split(tmp_path_factory):
    ds = data.get_dataset("bbc_news", prepared_dir("bbc_news", tmp_path_factory))
    few = ds.source("train", k_per_class=4, seed=1)
    labels = [int(few[i]["label"]) for i in range(len(few))]
    assert sorted(labels) == sorted(list(range(5)) * 4)
    again = ds.source("train", k_per_class=4, seed=1)
    assert [few[i]["id"] for i in range(len(few))] == [again[i]["id"] for i in range(len(few))]
    other = ds.source("train", k_per_class=4, seed=2)
    assert {few[i]["id"] for i in range(len(few))} != {other[i]["id"] for i in range(len(few))}
    assert len(ds.source("validation", first=50)) == 50
    assert len(ds.source("train", fraction=0.1)) == 178


def test_real_text_pipeline_with_workers_matches_in_process(tmp_path_factory):
    ds = data.get_dataset("bbc_news", prepared_dir("bbc_news", tmp_path_factory))
    prep = ds.preprocessor(tokenizer=minilm_tokenizer(), max_length=32)
    options = dict(global_batch_size=8, seed=3, shard_index=0, shard_count=1)
    in_process = _take(data.make_train_loader(ds.source("train"), prep, **options), 4)
    it = data.make_train_loader(ds.source("train"), prep, num_workers=2, **options)
    with_workers = _take(it, 3)
    state = it.get_state()
    resumed = data.make_train_loader(ds.source("train"), prep, num_workers=2, **options)
    resumed.set_state(state)
    for a, b in zip(in_process, with_workers + [next(resumed)], strict=True):
        for key in ("input_ids", "attention_mask", "token_type_ids", "label"):
            np.testing.assert_array_equal(a[key], b[key])
    assert in_process[0]["input_ids"].shape == (8, 32)
