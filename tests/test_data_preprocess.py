"""Image and text preprocessing: shapes, dtypes, normalisation, augmentation, tokenisation."""
import numpy as np
import pytest

from data_testing import minilm_tokenizer
from surm.data import ImagePreprocess, TextPreprocess

RNG = np.random.default_rng(0)
RGB = {"image": RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8), "label": np.int64(7)}


@pytest.mark.parametrize("normalization, low, high", [
    ("minus_one_to_one", -1, 1), ("zero_one", 0, 1), ("imagenet", -2.2, 2.7)])
def test_image_eval_shape_and_range(normalization, low, high):
    out = ImagePreprocess(size=24, normalization=normalization)(RGB)
    assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.float32
    assert low <= out["image"].min() and out["image"].max() <= high
    assert out["label"] == 7 and out["label"].dtype == np.int32


def test_normalizations_agree():
    zero_one = ImagePreprocess(size=24, normalization="zero_one")(RGB)["image"]
    minus_one = ImagePreprocess(size=24, normalization="minus_one_to_one")(RGB)["image"]
    imagenet = ImagePreprocess(size=24, normalization="imagenet")(RGB)["image"]
    np.testing.assert_allclose(minus_one, 2 * zero_one - 1, atol=1e-5)
    np.testing.assert_allclose(imagenet * [0.229, 0.224, 0.225] + [0.485, 0.456, 0.406],
                               zero_one, atol=1e-5)


def test_resize_keeps_a_constant_image_constant():
    flat = {"image": np.full((40, 60, 3), 51, np.uint8), "label": 0}
    out = ImagePreprocess(size=24, normalization="zero_one", central_crop=0.875)(flat)
    np.testing.assert_allclose(out["image"], 0.2, atol=1e-6)


def test_grayscale_becomes_three_equal_channels():
    gray = {"image": RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": 3}
    image = ImagePreprocess(size=32)(gray)["image"]
    assert image.shape == (32, 32, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_augmentation_is_a_function_of_the_rng():
    augment = ImagePreprocess(size=24, crop_scale=(0.08, 1.0), hflip=True)
    same = [augment(RGB, np.random.default_rng(5))["image"] for _ in range(2)]
    np.testing.assert_array_equal(*same)
    others = [augment(RGB, np.random.default_rng(seed))["image"] for seed in range(6)]
    assert not all(np.array_equal(others[0], o) for o in others[1:])
    assert all(o.shape == (24, 24, 3) for o in others)


def test_hflip_mirrors():
    flip = ImagePreprocess(size=24, hflip=True)
    plain = ImagePreprocess(size=24)(RGB)["image"]
    outs = [flip(RGB, np.random.default_rng(seed))["image"] for seed in range(8)]
    assert any(np.array_equal(o, plain[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, plain) for o in outs)


def test_augmentation_without_rng_and_bad_normalization_are_errors():
    with pytest.raises(ValueError, match="rng"):
        ImagePreprocess(size=24, hflip=True)(RGB)
    with pytest.raises(ValueError, match="minus_one_to_one"):
        ImagePreprocess(size=24, normalization="0-1")


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def test_single_sentence(tokenizer):
    prep = TextPreprocess(tokenizer, text_keys=("sentence",), max_length=16)
    out = prep({"sentence": b"a fine movie", "label": np.int64(1)})
    assert {k: (v.shape, v.dtype) for k, v in out.items() if k != "label"} == {
        k: ((16,), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    reference = tokenizer.encode("a fine movie").ids
    n = int(out["attention_mask"].sum())
    assert out["input_ids"][:n].tolist() == [i for i in reference if i != 0]
    assert out["input_ids"][0] == 101 and out["input_ids"][n - 1] == 102  # [CLS] ... [SEP]
    assert (out["input_ids"][n:] == 0).all() and not out["token_type_ids"].any()
    assert out["label"] == 1 and out["label"].dtype == np.int32


def test_pair_with_truncation_and_regression_label(tokenizer):
    prep = TextPreprocess(tokenizer, text_keys=("sentence1", "sentence2"), max_length=12,
                          regression=True)
    out = prep({"sentence1": "the cat sat on the mat " * 5, "sentence2": "a dog ran",
                "label": np.float32(3.8)})
    assert out["input_ids"].shape == (12,) and out["attention_mask"].all()
    ids, types = out["input_ids"].tolist(), out["token_type_ids"].tolist()
    assert ids.count(102) == 2 and ids[-1] == 102
    assert types[ids.index(102) + 1:] == [1] * (11 - ids.index(102))  # The second segment.
    assert out["label"].dtype == np.float32 and out["label"] == np.float32(3.8)


def test_the_given_tokenizer_is_not_changed(tokenizer):
    before = tokenizer.to_str()
    TextPreprocess(tokenizer, text_keys=("text",), max_length=8)
    assert tokenizer.to_str() == before


def test_text_errors(tokenizer):
    with pytest.raises(ValueError, match="pair"):
        TextPreprocess(tokenizer, text_keys=("a", "b", "c"))
    with pytest.raises(ValueError, match="<pad>"):
        TextPreprocess(tokenizer, text_keys=("a",), pad_token="<pad>")
