"""Image preprocessing: decoded uint8 image -> float32 (size, size, 3) for a pretrained model.

The normalisation must match the checkpoint's training convention:
``"minus_one_to_one"`` (x / 127.5 - 1; Google's ViT / big_vision checkpoints),
``"imagenet"`` ((x / 255 - mean) / std with the ImageNet mean and std; torchvision/timm
checkpoints), or ``"zero_one"`` (x / 255).

Training augmentation (random resized crop, horizontal flip) draws from the ``rng`` it is
given. The loaders pass grain's per-element generator, which is derived from the loader
seed and the element's position in the stream, so augmentation is identical on every run and
after a resume.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("minus_one_to_one", "imagenet", "zero_one")

Box = tuple[float, float, float, float]  # (left, upper, right, lower) in pixels.


def _random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                             scale: tuple[float, float], ratio: tuple[float, float]) -> Box:
    """Inception-style crop: area fraction in ``scale``, aspect ratio (w/h) in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return (left, top, left + w, top + h)
    return (0, 0, width, height)  # No sample fitted: the whole image.


def _central_box(height: int, width: int, fraction: float) -> Box:
    """A centred square whose side is ``fraction`` of the shorter side."""
    side = min(height, width) * fraction
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Callable ``(example, rng=None) -> {"image": float32 (size, size, 3), "label": int32}``.

    Attributes:
      size: output height and width.
      normalization: one of ``NORMALIZATIONS`` (see the module docstring).
      crop_scale: training only: random resized crop with this range of area fractions,
        e.g. ``(0.08, 1.0)``; None resizes the whole image.
      crop_ratio: aspect-ratio range of the random resized crop.
      hflip: training only: flip horizontally with probability 1/2.
      central_crop: evaluation: keep a centred square of this fraction of the shorter side
        before resizing (e.g. 0.875); None resizes the whole image to ``size`` x ``size``.
      image_key, label_key: feature names in the example.
    """

    size: int
    normalization: str = "minus_one_to_one"
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    central_crop: float | None = None
    image_key: str = "image"
    label_key: str = "label"

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalization {self.normalization!r}; "
                             f"choose one of {', '.join(NORMALIZATIONS)}")

    @property
    def random(self) -> bool:
        """Whether the output depends on the rng (training augmentation is on)."""
        return self.crop_scale is not None or self.hflip

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        if self.random and rng is None:
            raise ValueError("This ImagePreprocess augments and needs an rng: use it with "
                             "make_train_loader, and one without crop_scale and hflip for "
                             "evaluation.")
        pixels = np.asarray(example[self.image_key], dtype=np.uint8)
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        height, width = pixels.shape[:2]
        if self.crop_scale is not None:
            box = _random_resized_crop_box(height, width, rng, self.crop_scale, self.crop_ratio)
        elif self.central_crop is not None:
            box = _central_box(height, width, self.central_crop)
        else:
            box = (0, 0, width, height)
        image = Image.fromarray(pixels).convert("RGB").resize(
            (self.size, self.size), Image.Resampling.BILINEAR, box=box)
        out = np.asarray(image, dtype=np.float32)
        if self.hflip and rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": self._normalize(out),
                "label": np.int32(example[self.label_key])}

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        if self.normalization == "minus_one_to_one":
            return x / np.float32(127.5) - np.float32(1)
        if self.normalization == "zero_one":
            return x / np.float32(255)
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        return (x / np.float32(255) - mean) / std
