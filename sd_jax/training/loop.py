"""The run: check the config and the workdir, build the experiment, resume, compile, then train
up to each evaluation, evaluate, record and log, and write the summary (`train_and_evaluate`)."""
import contextlib
import logging
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from sd_jax.data import cifar_svhn

from sd_jax.training import checkpoints, compiler, disk_faults, parallel, provenance, records
from sd_jax.training.events import EventLog
from sd_jax.training.preemption import Preempted, StopSignals
from sd_jax.training.profiling import StepProfiler
from sd_jax.training.startup import StartupClock
from sd_jax.training.workdir_hold import hold_for_job
from sd_jax.config import resolve_convention, resolve_platform_defaults, validate
from sd_jax.models.cifar import count_params
from sd_jax.training.experiment import Experiment, make_experiment
from sd_jax.training.feeds import make_feed
from sd_jax.training.plan import TrainState, learning_rate_schedule
from sd_jax.training.steps import TRAIN_METRICS, eval_variables

log = logging.getLogger(__name__)
COMPILE_PHASE = "compile of the training call"


class TrainingDiverged(FloatingPointError):
    """The training loss stopped being finite; the message names the epoch and steps."""


def evaluation_steps(total_steps: int, steps_per_epoch: int, eval_every_steps: int) -> list:
    """The global step counts after which the run evaluates: every epoch's end, or every
    `eval_every_steps` steps (the authors' SVHN accounting: every 200 iterations) and the last step."""
    every = eval_every_steps or steps_per_epoch
    steps = list(range(every, total_steps + 1, every))
    return steps if steps and steps[-1] == total_steps else steps + [total_steps]


def epoch_of(step: int, steps_per_epoch: int):
    """Epochs done after `step` steps: an int at an epoch's end, else a fraction (4 decimals)."""
    return step // steps_per_epoch if step % steps_per_epoch == 0 else round(step / steps_per_epoch, 4)


class Trainer:
    """The phases of a run after setup: train up to the next evaluation, evaluate, record, log;
    stop at a signal with a checkpoint of the step reached."""

    def __init__(self, experiment: Experiment, workdir: records.Workdir, ckpts: checkpoints.Checkpoints, feed,
                 events: EventLog, stop_signals: StopSignals, profiler: StepProfiler, clock: StartupClock):
        self.experiment, self.config, self.plan = experiment, experiment.config, experiment.plan
        self.workdir, self.ckpts, self.feed = workdir, ckpts, feed
        self.events, self.stop_signals, self.profiler, self.clock = events, stop_signals, profiler, clock
        self.schedule = learning_rate_schedule(self.config, self.plan.steps_per_epoch)

    def once(self, name: str):
        """Time the run's first `name` as a start-up phase (later ones are not timed)."""
        return contextlib.nullcontext() if name in self.clock.seconds else self.clock.phase(name)

    def train_until(self, state: TrainState, stop: int, totals: dict):
        """Train from `state.step` up to global step `stop` in chunks of at most `steps_per_call`
        steps that never cross an epoch's end, adding the train metrics to `totals`; (state, totals,
        whether a signal asked to stop: then `state.step` may fall short of `stop`). A chunk's
        length depends only on the step it starts from, so a run resumed at a chunk's boundary
        runs the same chunks as one never stopped."""
        spe, total = self.plan.steps_per_epoch, self.plan.total_steps
        step, last_log = int(state.step), time.perf_counter()
        started, stopped = last_log, False
        while step < stop and not stopped:
            epoch, first = step // spe + 1, step % spe
            count = min(self.config.steps_per_call, stop - step, spe - first)
            self.profiler.before_call()
            with self.once("first training call"), self.profiler.annotate(step):
                state, sums = self.feed.train(state, epoch, first, count)
                sums = {k: float(v) for k, v in jax.device_get(sums).items()}
            self.profiler.after_call(state, count)
            if not np.isfinite(sums["loss"]):
                raise TrainingDiverged(
                    f"training loss became {sums['loss']} in epoch {epoch}, steps {first + 1}-{first + count} "
                    f"of {spe}; the checkpoints before it are kept. "
                    "Lower learning_rate (and start over with --restart) or check the data")
            totals = {k: totals[k] + sums[k] for k in totals}
            step += count
            stopped = self.stop_signals.should_stop()
            if time.perf_counter() - last_log > 30 and step < stop:
                last_log = time.perf_counter()
                log.info("epoch %d: step %d/%d (%d/%d in all), loss %.4f, %.0f img/s", epoch,
                         step - (epoch - 1) * spe, spe, step, total, totals["loss"] / totals["images"],
                         totals["images"] / (last_log - started))
        return state, totals, stopped

    def evaluate(self, state: TrainState, totals: dict, lr: float, seconds: float) -> dict:
        """One line of metrics.jsonl: training metrics since the previous line, then evaluation."""
        step = int(state.step)
        with self.once("first evaluation"):  # its compile included
            errors = self.feed.error_rates(eval_variables(state))
        return {
            "epoch": epoch_of(step, self.plan.steps_per_epoch),
            "step": step,
            "train_loss": totals["loss"] / totals["images"],
            "train_error": 100.0 * totals["errors"] / totals["images"],
            **errors,
            "lr": lr,
            "epoch_time_s": seconds,
            "images_per_s": totals["images"] / seconds,
            "mean_active_blocks": totals["active_blocks"] / totals["steps"],
        }

    def record(self, state: TrainState, line: dict, history: list) -> None:
        """Append the line; checkpoint at the checkpoint cadence and whenever the line is the best."""
        self.workdir.append_metrics(line)
        history.append(line)
        step, spe = line["step"], self.plan.steps_per_epoch
        on_cadence = (self.config.eval_every_steps or step % (self.config.checkpoint_every_epochs * spe) == 0
                      or step == self.plan.total_steps)
        if on_cadence or records.best_line(history) is line:
            self.ckpts.save(state, line)

    def log_line(self, line: dict) -> None:
        progress = (f"epoch {line['epoch']}/{self.config.num_epochs}" if not self.config.eval_every_steps else
                    f"step {line['step']}/{self.plan.total_steps} (epoch {line['epoch']:.2f})")
        top5 = (f" (top-5 {line['val_top5_error']:.2f}% / {line['test_top5_error']:.2f}%)"
                if "val_top5_error" in line else "")
        log.info("%s  loss %.4f  train %.2f%%  val %.2f%%  test %.2f%%%s  lr %.4g  %.1f s (%.0f img/s)  "
                 "active blocks %.1f/%d", progress, line["train_loss"], line["train_error"], line["val_error"],
                 line["test_error"], top5, line["lr"], line["epoch_time_s"], line["images_per_s"],
                 line["mean_active_blocks"], self.plan.model.num_blocks)

    def fit(self, state: TrainState, history: list, partial: Optional[dict] = None) -> TrainState:
        """Train from `state.step` to the end, evaluating, recording and logging at every evaluation
        step. `partial`: the training sums and seconds of the interval a stopped run was inside
        (its checkpoint's). A stop signal ends it with a checkpoint of the step reached and raises
        `Preempted`; the checkpoint is written whole before this returns or raises."""
        stops = evaluation_steps(self.plan.total_steps, self.plan.steps_per_epoch, self.config.eval_every_steps)
        try:
            for begin, stop in zip([0] + stops[:-1], stops):
                if stop <= int(state.step):
                    continue
                lr = float(f"{float(self.schedule(begin)):.7g}")  # float32 -> the config's decimal
                resumed_inside = partial is not None and int(state.step) > begin
                totals = dict(partial["totals"]) if resumed_inside else dict.fromkeys(TRAIN_METRICS, 0.0)
                start = time.perf_counter() - (partial["seconds"] if resumed_inside else 0.0)
                state, totals, stopped = self.train_until(state, stop, totals)
                seconds = time.perf_counter() - start
                if int(state.step) == stop:
                    line = self.evaluate(state, totals, lr, seconds)
                    self.record(state, line, history)
                    self.events.write(line)
                    self.log_line(line)
                    totals, seconds = dict.fromkeys(TRAIN_METRICS, 0.0), 0.0
                if stopped:
                    self.stop(state, totals, seconds)
        finally:
            self.ckpts.wait()
            self.ckpts.close()
            self.events.close()
            self.profiler.close()
        return state

    def stop(self, state: TrainState, totals: dict, seconds: float) -> None:
        """Checkpoint the step a stop signal left the run at, with the interval's sums, and raise `Preempted`."""
        step = int(state.step)
        self.ckpts.save_interrupted(state, epoch_of(step, self.plan.steps_per_epoch),
                                    {"totals": totals, "seconds": seconds})
        self.ckpts.wait()
        log.warning("checkpointed step %d (epoch %s); run the same command again to resume", step,
                    epoch_of(step, self.plan.steps_per_epoch))
        raise Preempted(self.stop_signals.received, step)


def warn_if_accelerator_idle() -> None:
    """Say prominently, before any work, when the machine has a GPU or TPU that JAX does not use."""
    idle = provenance.idle_accelerator()
    if idle:
        log.warning("\n%s\n!! This machine has %s, but JAX runs on the CPU (a CPU-only jaxlib): training would be "
                    "very slow.\n!! Stop it (Ctrl-C) and run: %s\n%s", "!" * 72, idle[0], idle[1], "!" * 72)


def log_start(experiment: Experiment, ran_on: dict) -> None:
    """What is about to train, and on what (`ran_on`: `provenance.provenance()`)."""
    config, plan, dataset = experiment.config, experiment.plan, experiment.dataset
    log.info("%s: %d train / %d val / %d test images; ResNet-%d, %d parameters, %d blocks, %.2f expected "
             "active; %d steps/epoch on %d x %s", dataset.name, len(dataset.train), len(dataset.val),
             len(dataset.test), config.depth, count_params(experiment.state.params), plan.model.num_blocks,
             float(plan.model.survival_probabilities().sum()),
             plan.steps_per_epoch, plan.mesh.size, jax.devices()[0].device_kind)
    log.info("on %s; %s; commit %s", provenance.hardware(ran_on),
             ", ".join(f"{name} {version}" for name, version in ran_on["versions"].items()), ran_on["git_commit"])


def resume(experiment: Experiment, workdir: records.Workdir, ckpts: checkpoints.Checkpoints):
    """(state, metrics history, the interrupted interval's sums or None) to continue from: the
    latest checkpoint's, or the initial state."""
    state, partial = experiment.state, None
    restored = ckpts.restore(state)
    if restored is not None:
        state, meta = restored
        partial = meta.get("partial")
        log.info("resuming from the checkpoint of epoch %s (step %d)", meta["epoch"], int(state.step))
    return state, workdir.truncate_metrics(int(state.step)), partial


def finish(experiment: Experiment, workdir: records.Workdir, history: list, clock: StartupClock,
           wall_start: float, ran_on: dict) -> dict:
    """Write and return summary.json: the paper's number (test error at best validation), costs
    (`startup_s`: the start-up phases' seconds) and what the run ran on."""
    plan = experiment.plan
    summary = records.summarize(history)
    summary.update(num_params=count_params(experiment.state.params), compile_s=clock.seconds[COMPILE_PHASE],
                   startup_s=clock.seconds, provenance=ran_on,
                   expected_active_blocks=float(plan.model.survival_probabilities().sum()),
                   wall_time_s=time.perf_counter() - wall_start)
    workdir.write_summary(summary)
    log.info("test error at best validation (epoch %s): %.2f%%; final test error %.2f%%",
             summary["best_val_epoch"], summary["test_error_at_best_val"], summary["final_test_error"])
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, restart: bool = False,
                       take_over: bool = False) -> dict:
    """Train as `config` says, writing config.json, metrics.jsonl, summary.json and checkpoints to
    `workdir`. A workdir holding an earlier run of the same config is resumed from its latest
    checkpoint; `restart` deletes the earlier run instead. Nothing is written until the config,
    the workdir and the data have passed every check. The run holds the workdir while it trains: a
    second run on it is refused (`workdir_hold`; `take_over` takes it from a holder known to be gone)."""
    warn_if_accelerator_idle()
    validate(config, cifar_svhn.DATASETS, jax.device_count())
    resolve_convention(config)
    resolve_platform_defaults(config, jax.devices()[0].platform)
    compiler.use_compilation_cache(config.compilation_cache_dir)
    disk_faults.drop_background_reports()
    run_files = records.Workdir(workdir, parallel.is_primary())
    run_files.check(config, restart)
    with hold_for_job(workdir, take_over) as take_hold:
        wall_start, clock = time.perf_counter(), StartupClock()
        experiment = make_experiment(config, clock.phase)
        take_hold()
        run_files.start(config, restart)
        ran_on = provenance.provenance()  # once: it asks git for the commit
        log_start(experiment, ran_on)
        ckpts = checkpoints.Checkpoints(workdir)
        try:
            with StopSignals() as stop_signals:
                state, history, partial = resume(experiment, run_files, ckpts)
                events = EventLog(workdir, parallel.is_primary(), config, history)
                feed = make_feed(experiment)
                with clock.phase(COMPILE_PHASE):
                    feed.compile(state)
                trainer = Trainer(experiment, run_files, ckpts, feed, events, stop_signals,
                                  StepProfiler(workdir, config.profile_steps), clock)
                trainer.fit(state, history, partial)
            return finish(experiment, run_files, history, clock, wall_start, ran_on)
        except Exception as e:
            code = disk_faults.fault_errno(e)
            if code is None:
                raise
            raise disk_faults.DiskFault(disk_faults.describe(code, workdir, *ckpts.newest_whole())) from None
