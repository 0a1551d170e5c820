"""Train a stochastic-depth ResNet:

    python train.py --config configs/quickstart.py --workdir runs/quickstart [--config.KEY=VALUE ...]

Running it again on the same --workdir resumes from the latest checkpoint. Exit codes
(docs/runs.md, "Command line"): 2 for a bad config, workdir or data (nothing is written), 3 when the loss stops
being finite or no checkpoint reads.
"""
from sd_jax import cli
from sd_jax.training import parallel
from sd_jax.training.loop import train_and_evaluate


def arg_parser():
    p = cli.parser(__doc__, config=True)
    p.add_argument("--workdir", required=True,
                   help="directory for config.json, metrics.jsonl, summary.json and checkpoints")
    p.add_argument("--restart", action="store_true",
                   help="delete the run already in --workdir and start over (by default a workdir holding a run "
                        "of the same config is resumed)")
    p.add_argument("--take-over", action="store_true",
                   help="take --workdir from the run holding it (its run.lock), when that run is known to be gone: "
                        "a holder on this machine that died frees it by itself, one on another host after 10 minutes")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process job with jax.distributed.initialize() (automatic when "
                        "JAX_COORDINATOR_ADDRESS is set or on a multi-host TPU slice)")
    return p


def run(args):
    parallel.initialize_distributed(args.distributed)
    cli.show_progress(parallel.is_primary())
    return train_and_evaluate(args.config, args.workdir, restart=args.restart, take_over=args.take_over)


def main(argv=None):
    return cli.main(arg_parser(), run, argv)


if __name__ == "__main__":
    main()
