"""The p_L sweep of the paper's Figure 8: one run per (mode, p_L), several at a time, resumable.

    python -m sd_jax.sweep --config configs/cifar10_resnet110_sd.py --root runs/sweep \\
        --p-last 0.1,0.2,0.5,0.8 --modes linear,uniform [--parallel N] [--runs-per-device K] \\
        [--shard I/N] [--config.num_epochs=10 ...]
    python -m sd_jax.report --sweep runs/sweep --out report/

Each run is its own process (this module with `--run NAME`, the training of `train.py`), writing
ROOT/<mode>_p<p_L> and its log ROOT/<mode>_p<p_L>.log, pinned to one local device: at most
`--parallel` devices (default: every GPU or TPU chip of the machine, 1 on the CPU) with at most
`--runs-per-device` runs each (a GPU's memory split between them). A finished run (summary.json
present) is skipped and an interrupted one resumes, so rerunning the command continues the sweep.
A run that fails is reported with its log and the others go on; the sweep then exits with 3,
naming the failed runs. SIGTERM or Ctrl-C reaches every running run, each checkpoints, and the
sweep exits 143 / 130. `--shard I/N` takes every N-th run of the grid from the I-th (an array
job's task I of N): N tasks cover the grid exactly once (docs/runs.md, "Sweeps").
"""
import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from sd_jax import cli, runtime
from sd_jax.training import records

log = logging.getLogger("sd_jax.sweep")  # not __name__: it is "__main__" under python -m
GRID_FILE = "sweep.json"
RUN_FLAG = "--run"
GPU_MEMORY_POOL = 0.75  # what JAX preallocates of a GPU for one process (XLA_PYTHON_CLIENT_MEM_FRACTION)
TPU_PORT = 8476
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count="  # a CPU run gets one device, whatever the sweep has  # the first libtpu mesh-controller port; one more per run on the host


class SweepInputError(ValueError):
    """A sweep that cannot be run as asked (its flags); the message says why."""


class SweepFailed(RuntimeError):
    """Some runs of the sweep failed; the message names them and their logs."""


class SweepStopped(Exception):
    """A signal stopped the sweep after its running runs checkpointed."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}: the running runs checkpointed; "
                         "run the same command again to resume the sweep")
        self.exit_code = 128 + signum


def run_name(mode: str, p_last: float) -> str:
    return f"{mode}_p{p_last:g}"


def grid(p_lasts, modes) -> list:
    """The sweep's runs as (mode, p_L), in one fixed order (mode by mode)."""
    return [(mode, p_last) for mode in modes for p_last in p_lasts]


def shard(runs: list, index: int, count: int) -> list:
    """Task `index` of `count`: every count-th run from the index-th, so the tasks cover `runs` once."""
    if not 0 <= index < count:
        raise SweepInputError(f"--shard I/N needs 0 <= I < N, got {index}/{count}")
    return runs[index::count]


def parse_shard(text: str):
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SweepInputError(f"--shard takes I/N (task I of N, from 0), got {text!r}") from None
    shard([], index, count)
    return index, count


def device_env(platform: str, device: str, slot: int, runs_per_device: int) -> dict:
    """The environment that pins a run to one device: CUDA_VISIBLE_DEVICES and its share of the GPU's
    memory; on TPU the per-process chip variables (one chip, its own mesh-controller port; JAX's
    recipe for one process per chip); on the CPU one host device."""
    if platform == "gpu":
        return {"CUDA_VISIBLE_DEVICES": device,
                "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{GPU_MEMORY_POOL / runs_per_device:.3f}"}
    if platform == "tpu":
        port = str(TPU_PORT + slot)
        return {"TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_VISIBLE_CHIPS": device,
                "TPU_VISIBLE_DEVICES": device, "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
                "TPU_MESH_CONTROLLER_PORT": port}
    return {"XLA_FLAGS": " ".join([flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                   if not flag.startswith(CPU_DEVICES_FLAG)] + [CPU_DEVICES_FLAG + "1"])}


def run_config(config, mode: str, p_last: float):
    run = config.copy_and_resolve_references()
    run.p_last, run.survival_mode = p_last, mode
    return run


def run_one(config, root: str, name: str, p_lasts, modes) -> dict:
    """In a run's own process: train the grid point `name` (its workdir under `root`)."""
    from sd_jax.training.loop import train_and_evaluate

    point = {run_name(mode, p): (mode, p) for mode, p in grid(p_lasts, modes)}
    if name not in point:
        raise SweepInputError(f"{name!r} is not in the sweep's grid ({', '.join(point)})")
    cli.show_progress()
    return train_and_evaluate(run_config(config, *point[name]), os.path.join(root, name))


class Sweep:
    """Runs the grid's runs as processes, at most `slots` at a time, each pinned to a device."""

    def __init__(self, argv: list, root: str, names: list, platform: str, devices: list, runs_per_device: int,
                 num_epochs: int):
        self.argv, self.root, self.names = argv, root, names
        self.platform, self.devices, self.runs_per_device = platform, devices, runs_per_device
        self.num_epochs = num_epochs
        self.running, self.failed, self.finished, self.signum = {}, [], [], None

    def workdir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def start(self, name: str, slot: int) -> None:
        device = self.devices[slot // self.runs_per_device]
        env = dict(os.environ, **device_env(self.platform, device, slot, self.runs_per_device))
        logfile = open(os.path.join(self.root, f"{name}.log"), "a")
        process = subprocess.Popen([sys.executable, "-m", "sd_jax.sweep", *self.argv, RUN_FLAG, name], env=env,
                                   stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        logfile.close()
        self.running[slot] = (name, process)
        if self.signum is not None:  # the signal came while this run was being started
            process.send_signal(self.signum)
        log.info("sweep: started %s on %s %s (log %s)", name, self.platform, device, logfile.name)

    def forward(self, signum, frame) -> None:
        """Pass SIGTERM / SIGINT on to every running run (each checkpoints) and start no more."""
        self.signum = signum
        for _, process in self.running.values():
            process.send_signal(signum)
        log.warning("sweep: %s passed on to %d running runs; waiting for their checkpoints",
                    signal.Signals(signum).name, len(self.running))

    def reap(self, slot: int, pending: int) -> None:
        name, process = self.running.pop(slot)
        code = process.returncode
        if code == 0:
            self.finished.append(records.read_json(self.workdir(name), records.SUMMARY_FILE))
            self.progress(name, pending)
        elif self.signum is not None and code in (128 + self.signum, -self.signum):
            log.info("sweep: %s stopped%s", name, "" if code < 0 else " after checkpointing")  # < 0: before training
        else:
            self.failed.append(name)
            log.error("sweep: %s failed (exit %s): see %s (workdir %s)", name, code,
                      os.path.join(self.root, f"{name}.log"), self.workdir(name))

    def progress(self, name: str, pending: int) -> None:
        """One line per finished run: its result, what remains, and the time left at the finished
        runs' mean epoch time with every slot busy."""
        epoch_s = sum(s["train_time_s"] / s["epochs_completed"] for s in self.finished) / len(self.finished)
        left = pending + len(self.running)
        eta = epoch_s * self.num_epochs * left / (len(self.devices) * self.runs_per_device)
        log.info("sweep: %s finished, test error at best validation %.2f%%; %d done, %d to go (%d running), "
                 "about %s left", name, self.finished[-1]["test_error_at_best_val"], len(self.finished), left,
                 len(self.running), cli.format_duration(eta))

    def run(self) -> None:
        pending = list(self.names)
        slots = len(self.devices) * self.runs_per_device
        previous = {s: signal.signal(s, self.forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while pending or self.running:
                for slot in range(slots):
                    if slot not in self.running and pending and self.signum is None:
                        self.start(pending.pop(0), slot)
                time.sleep(0.2)
                for slot, (_, process) in list(self.running.items()):
                    if process.poll() is not None:
                        self.reap(slot, len(pending))
                if self.signum is not None:
                    pending = []
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_sweep(config, root: str, p_lasts, modes, argv: list, parallel=None, runs_per_device: int = 1,
              shard_of=(0, 1)) -> list:
    """Train this task's share of the grid under `root`, `parallel` devices at a time; returns the
    workdirs. `argv`: the sweep's own command-line arguments, which each run's process gets again."""
    found = runtime.local_accelerators()
    platform, devices = found.platform, found.ids
    if platform == "cpu" and parallel:
        devices = ["cpu"] * parallel
    devices = devices[:parallel] if parallel else devices
    if platform == "tpu" and runs_per_device > 1:
        raise SweepInputError("a TPU chip takes one process: --runs-per-device must be 1 on TPU")
    names = [run_name(mode, p) for mode, p in shard(grid(p_lasts, modes), *shard_of)]
    os.makedirs(root, exist_ok=True)
    records.write_json_atomic(os.path.join(root, GRID_FILE), {"p_lasts": list(p_lasts), "modes": list(modes)})
    todo = []
    for name in names:
        if os.path.exists(os.path.join(root, name, records.SUMMARY_FILE)):
            log.info("sweep: %s is finished; skipping it", name)
        else:
            todo.append(name)
    log.info("sweep: %d runs in this task, %d to train, %d at a time on %d %s device(s)", len(names), len(todo),
             len(devices) * runs_per_device, len(devices), platform)
    sweep = Sweep(argv, root, todo, platform, devices, runs_per_device, config.num_epochs)
    sweep.run()
    if sweep.signum is not None:
        raise SweepStopped(sweep.signum)
    if sweep.failed:
        raise SweepFailed(f"{len(sweep.failed)} of {len(todo)} runs failed: "
                          + ", ".join(f"{name} (log {os.path.join(root, name + '.log')})" for name in sweep.failed)
                          + "; the others finished. Fix the cause and run the same command again")
    return [os.path.join(root, name) for name in names]


def comma_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def arg_parser():
    p = cli.parser(__doc__, config=True)
    p.add_argument("--root", required=True, help="folder for the sweep's run workdirs and logs")
    p.add_argument("--p-last", type=comma_list(float), default=[0.2, 0.5, 0.8],
                   help="comma-separated survival probabilities of the last block")
    p.add_argument("--modes", type=comma_list(str), default=["linear", "uniform"], help="comma-separated survival modes")
    p.add_argument("--parallel", type=int, default=None,
                   help="devices to use (default: every local GPU or TPU chip, 1 on the CPU)")
    p.add_argument("--runs-per-device", type=int, default=1,
                   help="runs sharing one GPU, each with its share of the memory (GPU and CPU only)")
    p.add_argument("--shard", default="0/1", help="I/N: this array-job task's share of the grid (every N-th run from I)")
    p.add_argument(RUN_FLAG, dest="run", help=argparse.SUPPRESS)
    return p


def run(args, argv):
    if args.run:
        return run_one(args.config, args.root, args.run, args.p_last, args.modes)
    cli.show_progress()
    if (args.parallel is not None and args.parallel < 1) or args.runs_per_device < 1:
        raise SweepInputError("--parallel and --runs-per-device must be at least 1")
    return run_sweep(args.config, args.root, args.p_last, args.modes, argv, args.parallel, args.runs_per_device,
                     parse_shard(args.shard))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = ((SweepInputError, cli.EXIT_BAD_INPUT), (SweepFailed, cli.EXIT_FAILED), (SweepStopped, None))
    return cli.main(arg_parser(), lambda args: run(args, argv), argv, extra_exit_codes=extra)


if __name__ == "__main__":
    main()
