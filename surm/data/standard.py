"""Standard tensorflow-datasets datasets: find them prepared on disk, or fail fast.

Reading needs no TensorFlow: prepared array_record files are opened with random access by a
tfds data source. Preparing a dataset (download and conversion) is a one-time step that
tensorflow-datasets does itself; it needs internet and TensorFlow, e.g.::

    pip install tensorflow
    tfds build cifar10 --data_dir=$HOME/.cache/surm/datasets --file_format=array_record
    tfds build glue/sst2 --data_dir=$HOME/.cache/surm/datasets --file_format=array_record

A dataset already prepared in tfds' default TFRecord format converts in place with
``tfds convert_format --dataset_version_dir=DATA_DIR/NAME/[CONFIG/]VERSION
--out_file_format=array_record``.

surm never downloads at run time. Without the files, tfds would either retry its download for
minutes or fail with a misleading "FileFormat.TFRECORD is not supported", so we look for the
files ourselves before tfds is called and raise ``DatasetNotPreparedError`` naming the
dataset, the folder searched and the command that prepares it.
"""
from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds
import tensorflow_datasets.text  # noqa: F401  (registers the GLUE builders)


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is not on disk in a form surm can read, and surm will not download it."""


def build_command(tfds_name: str, data_dir: pathlib.Path) -> str:
    """The shell command that downloads and prepares a standard dataset."""
    return (f"pip install tensorflow && tfds build {tfds_name} --data_dir={data_dir} "
            "--file_format=array_record")


def version_dir(tfds_name: str, data_dir: pathlib.Path) -> pathlib.Path:
    """Where tfds keeps the version of ``tfds_name`` that the installed tfds builds.

    ``data_dir/NAME/[CONFIG/]VERSION``, computed from the builder class without
    constructing a builder (which could touch the network).
    """
    name, _, config = tfds_name.partition("/")
    cls = tfds.builder_cls(name)
    version = cls.builder_configs[config].version if config else None
    return data_dir / tfds_name / str(version or cls.VERSION)


def require_prepared(tfds_name: str, data_dir: pathlib.Path) -> pathlib.Path:
    """Returns the prepared version folder, or raises DatasetNotPreparedError saying why."""
    path = version_dir(tfds_name, data_dir)
    has_info = (path / "dataset_info.json").is_file()
    if has_info and any(path.glob("*.array_record-*")):
        return path
    if has_info and any(path.glob("*.tfrecord-*")):
        raise DatasetNotPreparedError(
            f"Dataset {tfds_name!r} at {path} is prepared as TFRecord, which needs TensorFlow "
            "to read. Convert it to array_record once with:\n  pip install tensorflow && "
            f"tfds convert_format --dataset_version_dir={path} --out_file_format=array_record")
    others = sorted(p.name for p in path.parent.glob("*") if (p / "dataset_info.json").is_file())
    found = f" Found other versions there: {', '.join(others)}." if others else ""
    raise DatasetNotPreparedError(
        f"Dataset {tfds_name!r} is not prepared: no dataset_info.json and array_record files in "
        f"{path} (data_dir {data_dir}).{found} surm does not download at run time. Prepare it "
        f"once, with internet, by running:\n  {build_command(tfds_name, data_dir)}\n"
        "If it is prepared under another folder (tfds' default is ~/tensorflow_datasets), "
        "pass that folder as data_dir or set SURM_DATA_DIR.")


def builder(tfds_name: str, data_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
    """The tfds builder of a prepared standard dataset (fails fast when it is not prepared)."""
    require_prepared(tfds_name, data_dir)
    return tfds.builder(tfds_name, data_dir=data_dir)
