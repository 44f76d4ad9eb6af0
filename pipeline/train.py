"""Train a class-conditional DDPM.

    accelerate launch pipeline/train.py --config configs/cifar10.yaml [--section.key value ...] [--resume latest]
    python pipeline/train.py --config configs/quickstart-cpu.yaml

Exit status: 0 when the step/epoch budget is done; 75 when stopped early (SIGUSR1/SIGTERM or
train.max_minutes) with a checkpoint written, so a job script can requeue and resume; 3 when the loss
diverged (nothing non-finite is saved); 2 for bad input (config, data, checkpoint), one line from rank 0;
1 with one line when a checkpoint did not fit on the disk (its partial copy removed), and for any crash, with its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: make `import pipeline` find this package rather than its modules as top-level names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

# torch-free imports: a bad flag is refused before the heavy ones (pipeline.training) below
from pipeline.config import Config, load_config, options_help  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402

USAGE = "usage: train.py [--config FILE.yaml] [--resume latest|CHECKPOINT_DIR] [--section.key value ...]"


def main(argv: list[str] | None = None) -> int:
    return run_command(argv, __doc__, USAGE, ("--config", "--resume"), lambda known, overrides: load_config(known.config, overrides))


def run_command(argv: list[str] | None, doc: str, usage: str, flags: tuple[str, ...],
                config: Callable[[argparse.Namespace, list[str]], Config]) -> int:
    """A training command line (this one, ``python -m pipeline.distill``): ``--help``; its own ``flags`` (each taking a
    value; ``--resume`` among them) apart from the ``--section.key value`` overrides; the run's ``config`` from both;
    then ``_run_training``. Bad input is one line and exit status 2 before any heavy import."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(doc + "\n" + usage + "\n\nOptions (override any config value):" + options_help())
        return 0
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in flags:
        parser.add_argument(flag)
    try:
        try:
            known, overrides = parser.parse_known_args(args)
        except argparse.ArgumentError as error:  # the only one these flags raise: no value after the flag
            raise ConfigError(f"{error.argument_name} needs a value") from None
        cfg = config(known, overrides)
    except ConfigError as error:
        return _bad_input(f"{error}\n{usage}\n(--help lists every option)")
    return _run_training(cfg, known.resume)


def _run_training(cfg: Config, resume: str | None) -> int:
    """``train(cfg, resume)`` with this command line's exit statuses (also ``python -m pipeline.distill``'s)."""
    from pipeline.checkpointing import EXIT_DISK_FULL, DiskFullError  # heavy imports only after the arguments are good
    from pipeline.training import train

    try:
        return train(cfg, resume)
    except ConfigError as error:  # bad data or checkpoint; any other error at run time keeps its traceback
        return _bad_input(str(error))
    except DiskFullError as error:  # no bug: one line from the rank that met it, naming the disk and the last checkpoint
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DISK_FULL


def _bad_input(message: str) -> int:
    """Print ``message`` once (rank 0 of a multi-process launch) and return exit status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
