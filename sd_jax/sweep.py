"""The p_L sweep of the paper's Figure 8: one run per (mode, p_L), sequentially, resumable.

    python -m sd_jax.sweep --config configs/quickstart.py --root runs/sweep --p-last 0.2,0.5,0.8 \
        --modes linear,uniform [--config.num_epochs=10 ...]
    python -m sd_jax.report --sweep runs/sweep --out report/

Each run goes to ROOT/<mode>_p<p_L>; a finished run (summary.json present) is skipped and an
interrupted one resumes from its checkpoint, so rerunning the command continues the sweep.
"""
import logging
import os

from sd_jax import cli

from sd_jax.training import records
from sd_jax.training.loop import train_and_evaluate

log = logging.getLogger("sd_jax.sweep")  # not __name__: it is "__main__" under python -m


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
            train_and_evaluate(run_config, workdir)
    return workdirs


def comma_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def arg_parser():
    p = cli.parser(__doc__, config=True)
    p.add_argument("--root", required=True, help="folder for the sweep's run workdirs")
    p.add_argument("--p-last", type=comma_list(float), default=[0.2, 0.5, 0.8],
                   help="comma-separated survival probabilities of the last block")
    p.add_argument("--modes", type=comma_list(str), default=["linear", "uniform"], help="comma-separated survival modes")
    return p


def run(args):
    cli.show_progress()
    return run_sweep(args.config, args.root, args.p_last, args.modes)


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
