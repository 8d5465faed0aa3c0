"""``python scripts/study.py ...`` is ``python -m surm.study ...`` (surm/study/)."""
import sys

from surm.study.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
