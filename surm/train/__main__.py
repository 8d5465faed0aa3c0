"""``python -m surm.train --config configs/<file>.py[:k=v,...] --workdir DIR`` (and
``surm-train``): the command line of ``surm.train.train_and_evaluate``. Its flags are defined
here only, so that importing ``surm.train`` as a library defines none.

Multi-host (TPU pods, multi-node GPU): ``--distributed`` (or SURM_DISTRIBUTED=1) calls
``jax.distributed.initialize()``; on CPU give ``--coordinator_address``, ``--num_processes``
and ``--process_id``. Each process reads its own shard of the data; only process 0 writes.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from surm import allocator, cli, config_fields
from surm import workdir as workdir_files
from surm.checkpointing import CorruptCheckpointError
from surm.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:k=v,...]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", os.environ.get("SURM_DISTRIBUTED") == "1",
                                 "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ALLOW_RESUME = flags.DEFINE_list(
    "allow_resume_change", [], "Config fields a resumed run may change on purpose (e.g. "
    f"total_steps to extend it); any of: {', '.join(config_fields.resumable_on_request())}.")


def _initialize_distributed() -> None:
    if not _DISTRIBUTED.value:
        return
    # CPU processes talk through gloo (harmless where an accelerator has its own collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        cli.fail("--config and --workdir are required (a workdir is a folder of its own, never "
                 "''), e.g. --config configs/default.py --workdir runs/default", cli.USAGE)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds are chatty at INFO
    allocator.configure()  # before XLA's threads exist: see surm/allocator.py
    _initialize_distributed()
    try:
        with cli.stop_on_signals():
            cli.stop_with_parent()
            train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_RESUME.value)
    except cli.Stopped as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except (ValueError, FileNotFoundError, FloatingPointError, CorruptCheckpointError,
            workdir_files.WorkdirBusyError, OSError) as e:
        # an operating system's error (disk full, read-only, a file for a folder): its cause
        # and path; the project's own errors say themselves
        message = (cli.describe_os_error(e) if isinstance(e, OSError) and e.errno is not None
                   else str(e))
        print(f"error: {message}", file=sys.stderr)
        if isinstance(e, CorruptCheckpointError):
            # The failed restore's reads are still collected at exit, each with its own
            # traceback or warning: the run is over and its files closed, so leave now.
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
        sys.exit(cli.BUSY if isinstance(e, workdir_files.WorkdirBusyError) else 1)


def run() -> None:
    """The command line (``python -m surm.train``, ``surm-train``)."""
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
