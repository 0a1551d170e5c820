"""A run's files in its workdir: config.json, metrics.jsonl (one line per evaluation), summary.json."""
import json
import logging
import os
import shutil
import tempfile

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
# Config keys that may change when a run is resumed: they do not change its results.
RESUMABLE_KEYS = frozenset({"num_epochs", "steps_per_call", "eval_batch_size", "data_dir",
                            "checkpoint_every_epochs", "compilation_cache_dir"})

log = logging.getLogger(__name__)


class WorkdirError(OSError):
    """The workdir cannot be used; the message says why and what to do."""


def write_atomic(path: str, write, binary: bool = False) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it into place: readers never
    see a half-written file, and an interrupted write leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "wb" if binary else "w") as f:
        write(f)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def read_metrics(workdir: str) -> list:
    """The lines of metrics.jsonl. An unfinished last line (what a crash or a full disk in the middle
    of an append leaves) is dropped with a warning: it lies after the newest checkpoint, and a resumed
    run writes that evaluation again. A line elsewhere that is not JSON raises WorkdirError."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    history = []
    for number, line in lines:
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == lines[-1][0]:
                log.warning("%s: dropping its unfinished last line %d (%r), left by a run that stopped while "
                            "writing it", path, number, line.strip()[:80])
                continue
            raise WorkdirError(f"{path}, line {number}, is not a metrics line ({e.msg}): {line.strip()[:80]!r}. "
                               "Repair or delete that line and run the same command again (a resumed run rewrites "
                               "every line after its checkpoint), or pass --restart to start over") from None
    return history


def read_json(workdir: str, name: str):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f)


def config_record(config) -> dict:
    """The config as config.json holds it (plain JSON values)."""
    return json.loads(config.to_json_best_effort())


def best_line(history: list) -> dict:
    """The evaluation the paper reports: lowest validation error. Ties (common with a small
    validation set) go to the later one, the more trained model. The one rule: the summary and the
    best checkpoint both use it."""
    return min(reversed(history), key=lambda line: line["val_error"])


def summarize(history: list) -> dict:
    """The paper's reported number: test error at the evaluation of lowest validation error."""
    best = best_line(history)
    return {
        "best_val_epoch": best["epoch"],
        "best_val_step": best["step"],
        "best_val_error": best["val_error"],
        "test_error_at_best_val": best["test_error"],
        "final_test_error": history[-1]["test_error"],
        "final_val_error": history[-1]["val_error"],
        "epochs_completed": history[-1]["epoch"],
        "train_time_s": sum(line["epoch_time_s"] for line in history),
    }


class Workdir:
    """The files of one run in its workdir. In a multi-process job only the primary process writes."""

    def __init__(self, workdir: str, primary: bool = True):
        self.workdir = workdir
        self.primary = primary

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def holds_run(self) -> bool:
        """Whether a run has trained here: a metrics line or a checkpoint (a lone config.json is a
        start that failed before training, nothing to protect)."""
        checkpoint_dir = self.path(CHECKPOINT_DIR)
        return os.path.exists(self.path(METRICS_FILE)) or (os.path.isdir(checkpoint_dir) and bool(os.listdir(checkpoint_dir)))

    def check(self, config, restart: bool = False) -> None:
        """Raise WorkdirError unless the run can start here; writes nothing (`start` writes).

        The workdir (or its nearest existing parent) must be a writable directory; continuing a run
        is refused when its config differs in a key that changes the results.
        """
        existing = os.path.abspath(self.workdir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
            raise WorkdirError(f"workdir {self.workdir!r} is not writable ({existing!r} is not a writable "
                               "directory); pass a --workdir you can write to")
        if restart or not self.holds_run():
            return
        if not os.path.exists(self.path(CONFIG_FILE)):
            raise WorkdirError(f"workdir {self.workdir!r} holds a run but no {CONFIG_FILE}; "
                               "use another --workdir, or pass --restart to start over")
        old, new = read_json(self.workdir, CONFIG_FILE), config_record(config)
        changed = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise WorkdirError(f"workdir {self.workdir!r} holds a run with a different config ({diffs}); "
                               "use another --workdir, or pass --restart to delete that run and start over")

    def start(self, config, restart: bool = False) -> None:
        """Claim the workdir after `check` passed: write config.json, first deleting the earlier
        run's files if `restart` (or a failed start's lone config.json)."""
        if not self.primary:
            return
        try:
            os.makedirs(self.workdir, exist_ok=True)
            if restart:
                for name in (METRICS_FILE, SUMMARY_FILE):
                    if os.path.exists(self.path(name)):
                        os.remove(self.path(name))
                shutil.rmtree(self.path(CHECKPOINT_DIR), ignore_errors=True)
            write_json_atomic(self.path(CONFIG_FILE), config_record(config))
        except OSError as e:
            raise WorkdirError(f"workdir {self.workdir!r} is not writable ({e.strerror}); "
                               "pass a --workdir you can write to") from None

    def truncate_metrics(self, last_step: int) -> list:
        """Keep the metrics lines up to global step `last_step` (those the resumed checkpoint has
        seen) and return them."""
        if not os.path.exists(self.path(METRICS_FILE)):
            return []
        history = [line for line in read_metrics(self.workdir) if line["step"] <= last_step]
        if not self.primary:
            return history
        write_atomic(self.path(METRICS_FILE),
                     lambda f: f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in history))
        return history

    def append_metrics(self, line: dict) -> None:
        """Append one line and flush it to disk, so an interrupted run keeps every finished evaluation."""
        if not self.primary:
            return
        with open(self.path(METRICS_FILE), "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        if self.primary:
            write_json_atomic(self.path(SUMMARY_FILE), summary)

