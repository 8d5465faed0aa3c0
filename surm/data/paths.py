"""Where datasets live on this machine: a leaf module (it imports nothing of surm), so that every
part of ``surm.data`` can ask without importing another."""
from __future__ import annotations

import os
import pathlib
import stat


def default_data_dir() -> pathlib.Path:
    """``$SURM_DATA_DIR``, else ``~/.cache/surm/datasets``."""
    return pathlib.Path(os.environ.get("SURM_DATA_DIR") or "~/.cache/surm/datasets").expanduser()


# The first bytes of the compressed formats a data file is commonly shipped in.
_COMPRESSED = ((b"\x1f\x8b", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"),
               (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
               (b"PK\x03\x04", "zip", "unzip"))


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


def not_plain(path: pathlib.Path, *, folder: bool = False, compressed_ok: bool = False
              ) -> str | None:
    """Why an existing ``path`` cannot be read as a plain data file (or folder), or None: a
    named pipe, socket or device (reading one would block or never end), or a compressed file
    (its bytes would otherwise be reported as undecodable or empty lines)."""
    mode = path.stat().st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        return (f"{path} is {_kind(mode)}, not a regular {'folder' if folder else 'file'}; "
                "copy the data into one")
    if folder or compressed_ok or stat.S_ISDIR(mode):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None  # the reader reports it, naming the path and the cause
    for magic, kind, tool in _COMPRESSED:
        if head.startswith(magic):
            return (f"{path} is a {kind}-compressed file; decompress it first "
                    f"({tool} {path.name}) and give the plain file")
    return None
