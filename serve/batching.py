"""Dynamic batching: concurrent requests for one model run as one inference.

    batcher = DynamicBatcher(runner, max_queue_delay_us=2000, max_queue_size=256).start()
    result = batcher.infer(batch, deadline=time.monotonic() + 1.0)   # blocks; BatchResult
    pending = batcher.submit(batch)                                   # or: a future
    result = pending.result()

A worker takes the oldest request, then waits up to `max_queue_delay_us`
(counted from that request's arrival) for more until `max_batch_size` images
are queued, concatenates them, runs the runner once and hands each request its
rows.

- Idle fast path: a request that arrives while the model has no other request
  outstanding (queued or running) does not wait for company. Waiting only pays
  when others are in flight; a lone client (concurrency 1) would otherwise pay
  the whole delay on every request. `idle_fast_path=False` gives Triton's
  behaviour (always wait).
- Bounded queue (`max_queue_size` requests waiting; 0 = unbounded): a request
  arriving at a full queue fails at once with ResourceExhaustedError.
- Deadlines: a request whose deadline passed while it waited, or that was
  cancelled (`Pending.cancel()`: its client went away), is dropped, never run.
- Workers: a runner that is not thread-safe gets one; a thread-safe one gets
  `workers` (default 1: one worker keeps the batches big).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .backends.base import Runner
from .errors import DeadlineExceededError, InvalidInputError, ResourceExhaustedError

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    """One request's rows of a batch, and how it ran."""

    probabilities: np.ndarray
    queue_s: float  # arrival -> the batch started
    compute_s: float  # the whole batch's inference time
    batch_size: int  # images in the executed batch


class Pending:
    """A submitted request: `result(timeout)` blocks until its batch ran (or failed)."""

    __slots__ = ("batch", "size", "deadline", "arrival", "cancelled", "alone", "_done", "_result", "_error")

    def __init__(self, batch: np.ndarray, deadline: float | None):
        self.batch = batch
        self.size = int(batch.shape[0])
        self.deadline = deadline
        self.arrival = time.monotonic()
        self.cancelled = False
        self.alone = False  # arrived while nothing else was outstanding
        self._done = threading.Event()
        self._result: BatchResult | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """The caller no longer wants the result: if still queued, it is not run."""
        self.cancelled = True

    def _finish(self, result: BatchResult | None = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def result(self, timeout: float | None = None) -> BatchResult:
        """Wait for the result; gives up at the request's deadline (or `timeout`), and the request is then not run."""
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        if not self._done.wait(timeout):
            self.cancelled = True
            raise DeadlineExceededError(
                f"request for {self.size} image(s) did not finish within its deadline "
                f"(waited {time.monotonic() - self.arrival:.3f} s)"
            )
        if self._error is not None:
            raise self._error
        return self._result


class DynamicBatcher:
    """Queues requests for one runner and executes them in batches (see the module docstring)."""

    def __init__(self, runner: Runner, *, max_batch_size: int | None = None, max_queue_delay_us: int = 0,
                 max_queue_size: int = 0, workers: int = 1, stats=None, idle_fast_path: bool = True):
        self.runner = runner
        self.name = runner.name
        limit = runner.max_batch_size if max_batch_size is None else max_batch_size
        self.max_batch_size = max(1, int(limit or 1))
        self.max_queue_delay_s = max(0, int(max_queue_delay_us)) / 1e6
        self.max_queue_size = max(0, int(max_queue_size))
        self.workers = 1 if not runner.thread_safe else max(1, int(workers))
        self.stats = stats  # serve.metrics.ModelStats or None
        self.idle_fast_path = idle_fast_path
        self._outstanding = 0  # submitted and not yet finished (queued or running)
        self._queue: collections.deque[Pending] = collections.deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "DynamicBatcher":
        with self._cond:
            if not self._threads:
                for i in range(self.workers):
                    thread = threading.Thread(target=self._work, name=f"batcher-{self.name}-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, run the ones already queued, stop the workers."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    @property
    def queued(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    # ---- requests --------------------------------------------------------------------------
    def submit(self, batch: np.ndarray, deadline: float | None = None) -> Pending:
        """Validate and queue a batch; returns at once. `deadline` is a time.monotonic() value."""
        batch = self.runner.check(batch)
        if batch.shape[0] > self.max_batch_size:
            raise InvalidInputError(
                f"model '{self.name}': received a batch of {batch.shape[0]}, "
                f"expected at most max_batch_size={self.max_batch_size}"
            )
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceededError(f"model '{self.name}': the request's deadline passed before it was queued")
        pending = Pending(batch, deadline)
        with self._cond:
            if self._closing:
                raise ResourceExhaustedError(f"model '{self.name}' is shutting down and accepts no new requests")
            if not self._threads:
                raise RuntimeError(f"batcher for '{self.name}' was not started")
            if self.max_queue_size and len(self._queue) >= self.max_queue_size:
                raise ResourceExhaustedError(
                    f"model '{self.name}': queue full ({len(self._queue)} requests waiting, "
                    f"max_queue_size={self.max_queue_size}); retry later"
                )
            pending.alone = self._outstanding == 0
            self._outstanding += 1
            self._queue.append(pending)
            self._queued_images += pending.size
            self._cond.notify()
        return pending

    def infer(self, batch: np.ndarray, deadline: float | None = None) -> BatchResult:
        """submit() and wait for the result."""
        return self.submit(batch, deadline).result()

    # ---- worker ----------------------------------------------------------------------------
    def _take(self) -> list[Pending] | None:
        """Block until a batch is due; None when closing with an empty queue."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                first = self._queue[0]
                delay = 0.0 if (self.idle_fast_path and first.alone and len(self._queue) == 1) else self.max_queue_delay_s
                due = first.arrival + delay
                while self._queue and self._queued_images < self.max_batch_size and not self._closing:
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._queue:  # another worker took them
                    continue
                taken, images = [], 0
                while self._queue and images + self._queue[0].size <= self.max_batch_size:
                    request = self._queue.popleft()
                    self._queued_images -= request.size
                    images += request.size
                    taken.append(request)
                if self._queue:
                    self._cond.notify()  # let another worker start on the rest
                return taken

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            now = time.monotonic()
            live, outcomes = [], []
            for request in taken:
                if request.cancelled:  # its caller gave up (deadline) or its client went away
                    outcomes.append((request, None, DeadlineExceededError(
                        f"model '{self.name}': the request was cancelled before it ran")))
                    continue
                if request.deadline is not None and request.deadline <= now:
                    outcomes.append((request, None, DeadlineExceededError(
                        f"model '{self.name}': the request's deadline passed after "
                        f"{now - request.arrival:.3f} s in the queue; it was not run")))
                    if self.stats:
                        self.stats.expired()
                    continue
                live.append(request)
            if live:
                outcomes.extend(self._run(live, now))
            # no longer outstanding *before* the callers wake up: a caller's next request must see an idle model
            with self._cond:
                self._outstanding -= len(taken)
            for request, result, error in outcomes:
                request._finish(result, error)

    def _run(self, requests: list[Pending], started: float) -> list[tuple[Pending, BatchResult | None, BaseException | None]]:
        batch = requests[0].batch if len(requests) == 1 else np.concatenate([r.batch for r in requests])
        try:
            t0 = time.perf_counter()
            out = self.runner.infer(batch)
            compute = time.perf_counter() - t0
            if out.shape[0] != batch.shape[0]:
                raise RuntimeError(
                    f"model '{self.name}' returned {out.shape[0]} rows for a batch of {batch.shape[0]}"
                )
        except BaseException as exc:  # every waiting request learns why
            log.warning("model %s: batch of %d failed: %s", self.name, batch.shape[0], exc)
            return [(request, None, exc) for request in requests]
        size = int(batch.shape[0])
        if self.stats:
            self.stats.batch(size, compute, [started - r.arrival for r in requests])
        outcomes, row = [], 0
        for request in requests:
            outcomes.append((request, BatchResult(out[row : row + request.size], started - request.arrival, compute,
                                                  size), None))
            row += request.size
        return outcomes
