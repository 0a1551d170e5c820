"""What every command-line entry point shares: argparse parsing (with `--config FILE` and
`--config.KEY=VALUE` overrides), progress output, and one exit-code table.

Exit codes (docs/runs.md, "Command line"): 0 done; 1 an unexpected error (a bug: the traceback is printed);
2 bad input, found before anything is written (usage, config, workdir, data, a missing file);
3 the work failed on the way (the training loss diverged, no checkpoint could be read, the workdir
stopped taking writes: a full disk, a quota, a read-only file system);
128 + the signal's number (143 SIGTERM, 130 SIGINT): stopped by a signal after checkpointing the step reached.
"""
import argparse
import logging
import sys

from absl import logging as absl_logging

from sd_jax.training.checkpoints import CheckpointError
from sd_jax.config import ConfigError, load_config
from sd_jax.data.files import DataError
from sd_jax.training.disk_faults import DiskFault
from sd_jax.training.records import WorkdirError
from sd_jax.training.loop import TrainingDiverged
from sd_jax.training.preemption import Preempted

EXIT_BAD_INPUT, EXIT_FAILED = 2, 3
EXIT_CODES = ((ConfigError, EXIT_BAD_INPUT), (WorkdirError, EXIT_BAD_INPUT), (DataError, EXIT_BAD_INPUT),
              (FileNotFoundError, EXIT_BAD_INPUT), (TrainingDiverged, EXIT_FAILED), (CheckpointError, EXIT_FAILED),
              (DiskFault, EXIT_FAILED), (Preempted, None))  # None: the exception's own exit_code
CONFIG_OVERRIDE = "--config."


def parser(doc: str, config: bool = False) -> argparse.ArgumentParser:
    """An argument parser showing the module docstring as its help; with `config`, a required
    `--config FILE` whose keys may be overridden as `--config.KEY=VALUE`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        p.add_argument("--config", required=True, metavar="FILE",
                       help="experiment config: a .py file whose get_config() returns a ConfigDict, or the name of "
                            "one in configs/; override any key with --config.KEY=VALUE")
    return p


def show_progress(primary: bool = True) -> None:
    """sd_jax's progress lines on stderr (primary process only); other libraries' INFO logs stay quiet."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    package_log = logging.getLogger("sd_jax")
    if not primary or package_log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False


def format_duration(seconds: float) -> str:
    """"1h05m" or "4m07s": a duration for progress lines and tables."""
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def main(arg_parser: argparse.ArgumentParser, run, argv=None, extra_exit_codes=()):
    """Parse `argv` (default: the command line), load the config if the parser takes one, and
    return run(args); a known failure (EXIT_CODES, and the tool's own `extra_exit_codes`) becomes
    one "error: ..." line on stderr and its exit code."""
    codes = EXIT_CODES + tuple(extra_exit_codes)
    args, extra = arg_parser.parse_known_args(argv)
    takes_config = "config" in vars(args)
    stray = [a for a in extra if not (takes_config and a.startswith(CONFIG_OVERRIDE))]
    if stray:
        arg_parser.error(f"unrecognized arguments: {' '.join(stray)}")  # argparse exits with 2 (EXIT_BAD_INPUT)
    try:
        if takes_config:
            args.config = load_config(args.config, extra)
        return run(args)
    except tuple(kind for kind, _ in codes) as e:
        print(f"error: {e}", file=sys.stderr)
        code = next(code for kind, code in codes if isinstance(e, kind))
        sys.exit(e.exit_code if code is None else code)
