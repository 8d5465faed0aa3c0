"""``python -m surm.export --workdir DIR --out PATH``: the command of `surm.interop.export`."""
from surm.interop.export import export, main, run_cli  # noqa: F401

if __name__ == "__main__":
    from surm.interop.export import cli_main
    cli_main()
