"""The seconds a run spends before and in its first step, phase by phase (data, initialisation,
data on the devices, compile, first training call, first evaluation): logged as each ends and
kept in summary.json's `startup_s`, so a slow start says where it went."""
import contextlib
import logging
import time

log = logging.getLogger(__name__)


class StartupClock:
    """`with clock.phase(name): ...` times one phase; `seconds` holds them in order."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("start-up: %s took %.1f s", name, self.seconds[name])


def untimed(name: str):
    """A phase nobody times (callers of `make_experiment` other than the training run)."""
    return contextlib.nullcontext()
