"""Where datasets live on this machine: a leaf module (it imports nothing of surm), so that every
part of ``surm.data`` can ask without importing another."""
from __future__ import annotations

import os
import pathlib


def default_data_dir() -> pathlib.Path:
    """``$SURM_DATA_DIR``, else ``~/.cache/surm/datasets``."""
    return pathlib.Path(os.environ.get("SURM_DATA_DIR") or "~/.cache/surm/datasets").expanduser()
