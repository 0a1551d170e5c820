"""The p_L sweep of the paper's Figure 8: one run per (mode, p_L), sequentially, resumable.

    python -m sd_jax.sweep --config configs/quickstart.py --root runs/sweep --p_last 0.2,0.5,0.8 \
        --modes linear,uniform [--config.num_epochs=10 ...]
    python -m sd_jax.report --sweep runs/sweep --out report/

Each run goes to ROOT/<mode>_p<p_L>; a finished run (summary.json present) is skipped and an
interrupted one resumes from its checkpoint, so rerunning the command continues the sweep.
"""
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from sd_jax import cli, records, training

log = logging.getLogger("sd_jax.sweep")  # not __name__: it is "__main__" under python -m

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_ROOT = flags.DEFINE_string("root", None, "Folder for the sweep's run workdirs.")
_P_LAST = flags.DEFINE_list("p_last", ["0.2", "0.5", "0.8"], "Survival probabilities of the last block.")
_MODES = flags.DEFINE_list("modes", ["linear", "uniform"], "Survival modes.")


def run_sweep(config, root: str, p_lasts, modes) -> list:
    """Train every (mode, p_L) in turn under `root`; returns the workdirs."""
    workdirs = []
    for mode in modes:
        for p_last in p_lasts:
            workdir = os.path.join(root, f"{mode}_p{p_last:g}")
            workdirs.append(workdir)
            if os.path.exists(os.path.join(workdir, records.SUMMARY_FILE)):
                log.info("%s is finished; skipping it", workdir)
                continue
            run_config = config.copy_and_resolve_references()
            run_config.p_last, run_config.survival_mode = p_last, mode
            log.info("sweep run %s", workdir)
            training.train_and_evaluate(run_config, workdir)
    return workdirs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.show_progress()
    cli.run_or_exit(run_sweep, _CONFIG.value, _ROOT.value, [float(p) for p in _P_LAST.value], _MODES.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "root"])
    app.run(main)
