"""Image folders and ``.npz`` arrays -> image examples: ``id``, ``image`` (RGB), ``label``.

Image folder (``folder:PATH``): one subfolder per class, named after it; the images of a class
may sit in nested folders below its subfolder. Every file is read with Pillow (PNG, JPEG, BMP,
GIF, TIFF, WebP, ... whatever it opens; the first frame of an animation), turned upright by
its EXIF orientation, and converted to 8-bit RGB: grayscale is repeated, palette images are
expanded, alpha is dropped. 16-bit and floating-point modes (``I;16``, ``I``, ``F``) are
refused rather than guessed at. Names starting with ``.`` (``.DS_Store``, ``.surm_cache``) are
ignored. A file Pillow cannot read, or a file beside the class folders, is a bad image
(``drop_bad=true`` leaves it out); an empty class folder is an error. ``id`` is the path
relative to the folder, e.g. ``cat/001.jpg``.

``.npz`` (``npz:PATH``), read with ``allow_pickle=False``:

- images: the array named ``images``, ``image``, ``x`` or ``X`` (or ``image=NAME``), shaped
  N x H x W (grayscale) or N x H x W x C with C = 1, 3 or 4 (NHWC; the 4th channel, alpha,
  is dropped). dtype uint8 (0-255), another integer type with values in 0-255, or float with
  values in [0, 1] (scaled by 255 and rounded).
- labels: the array named ``labels``, ``label``, ``y`` or ``Y`` (or ``label=NAME``), shape N
  (or N x 1): integers or strings (class names). Floats are accepted when they are whole.

``id`` is ``FILE[i]``. Images are stored as lossless PNG of the RGB pixels, whatever the
source format, so every decoder gives the same pixels.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pathlib
import warnings
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from surm.data.local import labels
from surm.data.local.cache import Conversion, is_hidden
from surm.data.local.problems import LocalDataError, Problems
from surm.data.local.spec import LocalSpec

IMAGE_KEYS = ("images", "image", "x", "X")
LABEL_KEYS = ("labels", "label", "y", "Y")
_FEATURES = {"id": tfds.features.Text(), "image": tfds.features.Image(shape=(None, None, 3))}


def _png(rgb: Image.Image) -> bytes:
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow wants palette transparency expanded first.
    return image.convert("RGB")


def _read_image(path: pathlib.Path, problems: Problems) -> bytes | None:
    """The image as RGB PNG bytes, or None (reported) when it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.mode in ("I", "F") or image.mode.startswith("I;"):
                    problems.add(path, None, f"{image.mode} pixels (16-bit or floating point); "
                                 "convert the image to 8 bits per channel")
                    return None
                return _png(_rgb(ImageOps.exif_transpose(image)))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        problems.add(path, None, f"too large to decode safely ({e}); downscale it")
    except (OSError, SyntaxError, ValueError) as e:
        problems.add(path, None, f"not an image Pillow can read ({e})")
    return None


def _class_files(root: pathlib.Path, problems: Problems) -> dict[str, list[pathlib.Path]]:
    """Class name -> its image files, sorted by path."""
    entries = sorted(p for p in root.iterdir() if not is_hidden(p, root))
    folders = [p for p in entries if p.is_dir()]
    for path in entries:
        if not path.is_dir():
            problems.add(path, None, "a file beside the class folders; every image goes in "
                         "the subfolder of its class")
    if not folders:
        raise LocalDataError(
            f"{root} has no class folders: put the images of each class in a subfolder named "
            f"after it ({root}/cat/1.jpg, {root}/dog/2.png, ...)")
    classes = {}
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not is_hidden(p, folder))
        if not files:
            raise LocalDataError(
                f"class folder {folder} holds no images (names starting with '.' are "
                f"ignored); add the images of class {folder.name!r} or remove the folder")
        classes[folder.name] = files
    return classes


def convert_folder(spec: LocalSpec) -> Conversion:
    problems = Problems()
    files = spec.files()
    found = {split: _class_files(root, problems) for split, root in files.items()}
    ids = labels.label_map([c for classes in found.values() for c in classes], spec.name)
    # (id, path, class) per split; the held-out fractions are cut from the train folder.
    items = {split: [(path.relative_to(files[split]).as_posix(), path, name)
                     for name, paths in classes.items() for path in paths]
             for split, classes in found.items()}
    train, fractions = items["train"], spec.fractions()
    splits = labels.assign(items, [ids[c] for _, _, c in train], [i for i, _, _ in train],
                           fractions, name=spec.name, main=str(spec.path), classes=ids)
    counts = {s: collections.Counter() for s in splits}

    def examples(split):
        for item_id, path, name in splits[split]:
            png = _read_image(path, problems)
            if png is not None:
                counts[split][name] += 1
                yield item_id, {"id": item_id, "image": png, "label": ids[name]}

    def finish():
        dropped = problems.resolve(spec.name, spec.drop_bad, unit="images")
        empty = [name for name in ids if not sum(c[name] for c in counts.values())]
        if empty:
            raise LocalDataError(f"{spec.name}: no readable images left in class "
                                 f"{', '.join(map(repr, empty))}")
        labels.check_sizes({s: sum(c.values()) for s, c in counts.items()}, spec.name,
                           fractions, str(spec.path))
        return _metadata(ids, counts, dropped)

    return Conversion(features={**_FEATURES, "label": tfds.features.ClassLabel(names=list(ids))},
                      splits={s: examples(s) for s in splits}, finish=finish)


def _metadata(ids: dict[str, int], counts: dict[str, collections.Counter], dropped: dict
              ) -> dict:
    return {"modality": "image", "label_map": ids, "dropped": dropped,
            "sizes": {s: sum(c.values()) for s, c in counts.items()},
            "class_counts": {s: {name: c[name] for name in ids} for s, c in counts.items()}}


def _array(npz, path: pathlib.Path, key: str | None, usual: tuple[str, ...], what: str,
           option: str) -> np.ndarray:
    names = [key] if key else [k for k in usual if k in npz.files]
    if not names or names[0] not in npz.files:
        wanted = repr(key) if key else " or ".join(map(repr, usual))
        raise LocalDataError(
            f"{path} has no {what} array {wanted} (arrays: {', '.join(npz.files) or 'none'}); "
            f"name it in the spec with {option}=NAME")
    try:
        return npz[names[0]]
    except ValueError as e:  # Object arrays need unpickling, which we never do.
        raise LocalDataError(f"{path}: array {names[0]!r} cannot be read without unpickling "
                             f"({e}); save plain numeric or string arrays") from None


def _check_images(images: np.ndarray, path: pathlib.Path) -> None:
    if images.ndim not in (3, 4) or images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        hint = (" It looks like N x C x H x W: transpose it to N x H x W x C."
                if images.ndim == 4 and images.shape[1] in (1, 3, 4) else "")
        raise LocalDataError(f"{path}: images of shape {images.shape}; expected N x H x W "
                             f"or N x H x W x C with C = 1, 3 or 4.{hint}")
    kind = images.dtype.kind
    if kind not in "fiu":
        raise LocalDataError(f"{path}: images of dtype {images.dtype}; expected uint8 or float")
    if not images.size:
        return
    low, high = images.min(), images.max()
    if kind == "f" and not (0 <= low and high <= 1):  # NaN fails too.
        raise LocalDataError(f"{path}: float images must lie in [0, 1] (found {low:g} to "
                             f"{high:g}); scale them or store uint8")
    if kind in "iu" and not (0 <= low and high <= 255):
        raise LocalDataError(f"{path}: integer images must lie in 0-255 (found {low} to "
                             f"{high})")


def _rgb_pixels(image: np.ndarray) -> np.ndarray:
    """One checked image (H x W, or H x W x C) as uint8 H x W x 3."""
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype.kind == "f":
        image = np.round(image * 255)
    image = image.astype(np.uint8)[..., :3]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _label_names(values: np.ndarray, path: pathlib.Path, count: int) -> list[str]:
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1 or len(values) != count:
        hint = " (one-hot labels? store the class index: labels.argmax(1))" if (
            values.ndim == 2) else ""
        raise LocalDataError(f"{path}: labels of shape {values.shape} for {count} images; "
                             f"expected shape ({count},){hint}")
    kind = values.dtype.kind
    if kind == "f":
        if not (np.isfinite(values) & (values == np.round(values))).all():
            raise LocalDataError(f"{path}: labels must be class ids or names; found fractional "
                                 "or non-finite numbers")
        values = values.astype(np.int64)
    if kind == "S":
        return [v.decode("utf-8", "replace") for v in values]
    if kind in "fiub" or kind == "U":
        return [str(v) for v in values.tolist()]
    raise LocalDataError(f"{path}: labels of dtype {values.dtype}; expected integers or strings")


def _read_npz(spec: LocalSpec, path: pathlib.Path) -> tuple[np.ndarray, list[str]]:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise LocalDataError(f"{path} is not a readable .npz ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise LocalDataError(f"{path} holds a single array; save images and labels together "
                             "with np.savez(path, images=images, labels=labels)")
    with npz:
        images = _array(npz, path, spec.image_key, IMAGE_KEYS, "images", "image")
        raw_labels = _array(npz, path, spec.label_column, LABEL_KEYS, "labels", "label")
    _check_images(images, path)
    return images, _label_names(raw_labels, path, len(images))


def convert_npz(spec: LocalSpec) -> Conversion:
    arrays = {split: _read_npz(spec, path) for split, path in spec.files().items()}
    ids = labels.label_map([n for _, names in arrays.values() for n in names], spec.name)
    # (id, images, index, class) per split.
    items = {split: [(f"{spec.files()[split].name}[{i}]", images, i, name)
                     for i, name in enumerate(names)]
             for split, (images, names) in arrays.items()}
    train, fractions = items["train"], spec.fractions()
    splits = labels.assign(items, [ids[item[3]] for item in train],
                           [hashlib.sha256(images[i].tobytes()).hexdigest()
                            for _, images, i, _ in train],
                           fractions, name=spec.name, main=str(spec.path), classes=ids)
    counts = {s: collections.Counter(item[3] for item in v) for s, v in splits.items()}

    def examples(split):
        for item_id, images, i, name in splits[split]:
            pixels = Image.fromarray(_rgb_pixels(images[i]))
            yield item_id, {"id": item_id, "image": _png(pixels), "label": ids[name]}

    return Conversion(
        features={**_FEATURES, "label": tfds.features.ClassLabel(names=list(ids))},
        splits={s: examples(s) for s in splits},
        finish=lambda: _metadata(ids, counts, {"count": 0, "first": []}))
