"""A live progress bar for `liverec train`: events, events/s, loss, online HR@10, lag."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from tqdm import tqdm

from liverec.trainer.worker import TrainerWorker


class TrainingProgress:
    """Refreshes a tqdm bar from the worker's counters on a background thread."""

    def __init__(self, worker: TrainerWorker, enabled: bool = True, every_s: float = 0.5) -> None:
        self.worker = worker
        self.enabled = enabled
        self.every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)

    def _loop(self) -> None:
        m = self.worker.metrics
        with tqdm(unit="ev", desc="train", file=sys.stderr, dynamic_ncols=True) as bar:
            while not self._done.wait(self.every_s):
                c = self.worker.counters
                bar.update(c.consumed - bar.n)
                lag = sum(s.value for metric in m.lag.collect() for s in metric.samples)
                bar.set_postfix(loss=f"{m.loss._value.get():.3f}", hr10=f"{m.preq_hr._value.get():.3f}",
                                dlq=sum(c.dead_lettered.values()), lag=int(lag), refresh=False)

    def __enter__(self) -> TrainingProgress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self.enabled:
            self._thread.join()
