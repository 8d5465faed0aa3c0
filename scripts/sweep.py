"""``python scripts/sweep.py ...`` is ``python -m surm.sweep ...`` (see ``surm/sweep``)."""
import sys

from surm.sweep.__main__ import run

if __name__ == "__main__":
    sys.exit(run())
