"""TensorBoard event files in the workdir: every metrics.jsonl line as scalars (its keys as tags,
the global step as the step), the config as text and as hyperparameters, so `tensorboard
--logdir runs/` compares runs. Written with tensorboardX: a maintained writer of the event format
that needs no TensorFlow (clu's writer goes through tf.summary, and the CIFAR loop keeps TensorFlow
out of the process). metrics.jsonl is the record: at every start the event file is rewritten from
the lines the run resumed with, so a resumed run has each point exactly once."""
import contextlib
import glob
import json
import os
import sys

from sd_jax.training.records import config_record


@contextlib.contextmanager
def torch_marked_absent():
    """Imports inside see PyTorch as not installed, unless this process already imported it.
    tensorboardX's writer imports torch whenever it is installed, for a type annotation only: 3 s
    at every train.py start (Colab has torch). A None entry in sys.modules makes `import torch`
    raise ImportError, which tensorboardX handles; a later `import torch` works as before."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        del sys.modules["torch"]


with torch_marked_absent():
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

EVENTS_PATTERN = "events.out.tfevents.*"
LINKED_METRICS = ("val_error", "test_error", "train_loss")  # shown beside the hyperparameters


def hyperparameters(record: dict) -> dict:
    """config.json's entries as TensorBoard accepts them: numbers, strings and booleans (others as JSON text)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in record.items()}


class EventLog:
    """The run's TensorBoard events (primary process only; the others write nothing)."""

    def __init__(self, workdir: str, primary: bool, config, history: list):
        self.writer = None
        if not primary:
            return
        for stale in glob.glob(os.path.join(workdir, EVENTS_PATTERN)):
            os.remove(stale)
        record = config_record(config)
        self.writer = SummaryWriter(workdir)
        self.writer.add_text("config", "```\n" + json.dumps(record, indent=2, sort_keys=True) + "\n```", 0)
        for summary in hparams(hyperparameters(record), dict.fromkeys(LINKED_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        for line in history:
            self.write(line)

    def write(self, line: dict) -> None:
        """One metrics line: every numeric value but the step, at the line's step."""
        if self.writer is None:
            return
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, line["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
