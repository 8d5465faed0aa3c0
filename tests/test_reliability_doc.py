"""docs/RELIABILITY.md names, for every promise, a test that exists: a renamed or deleted test
fails here rather than leaving a promise unchecked."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_promise_names_tests_that_exist():
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    rows = [line for line in doc.splitlines()
            if line.startswith("| ") and not line.startswith(("| promise", "|---"))]
    assert len(rows) >= 15
    for row in rows:
        refs = [r for r in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[-2]) if "::" in r]
        assert refs, f"a promise without a test: {row[:80]}"
        file = None
        for ref in refs:  # `file::name`, or `::name` for the file named before it
            name_file, name = ref.split("::")
            file = name_file or file
            source = (ROOT / "tests" / file).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), ref
