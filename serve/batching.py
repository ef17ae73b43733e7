"""Dynamic batching: concurrent requests for one model run as one inference.

    batcher = DynamicBatcher(runner, max_queue_delay_us=2000, max_queue_size=256).start()
    result = batcher.infer(batch, deadline=time.monotonic() + 1.0)   # blocks; BatchResult
    pending = batcher.submit(batch)                                   # or: a future
    result = pending.result()
    batcher.close(deadline=time.monotonic() + 10)                     # drain, stop, close the runner

A worker takes the oldest request, then waits up to `max_queue_delay_us`
(counted from that request's arrival) for more requests of the same image
shape until `max_batch_size` images are queued, concatenates them, runs the
runner once and hands each request its rows.

- Shapes: only requests whose images have the same shape are concatenated (what
  Triton does for inputs that are not ragged), so a model with dynamic dims
  serves mixed sizes; a batch of one shape never waits behind another shape's.
- Idle fast path: a request that arrives while the model has no other request
  outstanding (queued or running) does not wait for company. `idle_fast_path=False`
  gives Triton's behaviour (always wait).
- Every request taken is finished, whatever fails: concatenation, the runner,
  splitting the rows or the statistics raising fail that batch's requests with
  BackendError (INTERNAL, one line), logged once per distinct message (then at
  most once a minute with a count), and the worker goes on. A model whose every
  batch has failed for `unhealthy_after_s` reports it in `health()`.
- Admission: a request arriving at a full queue (`max_queue_size` requests
  waiting; 0 = unbounded) fails at once with ResourceExhaustedError, and so does
  a request whose expected wait (the images queued and running ahead of it, at
  this model's measured batch times) ends after its deadline: refused now rather
  than queued to time out.
- Deadlines: a request whose deadline passed while it waited, or that was
  cancelled (`Pending.cancel()`: its client went away), is dropped, never run.
- Shutdown: `close(deadline)` refuses new requests and runs the queued ones
  until `deadline`; what is still queued or running then is failed with
  ServerUnavailableError and the workers are abandoned. The runner is closed by
  the last worker to stop (with `close_runner=True`), never while one is inside it.
- Workers: a runner that is not thread-safe gets one; a thread-safe one gets
  `workers` (default 1: one worker keeps the batches big), or more if the runner
  prefers them (`preferred_workers`: onnxruntime's adaptive threads).
- Side by side: with a runner that prefers several workers, a worker takes at most
  its share of the images in the model (queued and running, divided by the
  workers), so the workers' batches stay even: one narrow batch holding most of
  the clients would take twice as long as the same work split (measured: p95 up
  to 44 % longer at 32 clients without the split, equal to one wide session with it).
  A worker that starts while another batch runs does not wait the queue delay for
  more requests (it takes what is queued, up to its share): on its own cores a
  bigger batch gains almost nothing per image, and the wait is latency.
- Light load: while the model holds at most LIGHT_LOAD_IMAGES_PER_WORKER images
  per worker (queued and running), side-by-side workers take one request each:
  a worker is free again after one image's time instead of a batch's, so a
  request waits less for one (p95 at 4 and 8 clients 13-17 % shorter, measured).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from .backends.base import Runner
from .errors import (BackendError, DeadlineExceededError, InvalidInputError, KestrelError, ResourceExhaustedError,
                     ServerUnavailableError)

log = logging.getLogger(__name__)

UNHEALTHY_AFTER_S = 10.0  # every batch failing for this long (and at least 3 of them): health() says so
# side-by-side workers take one request at a time while the model holds at most this many images per worker
# (docs/server.md: measured against 2 and against no limit)
LIGHT_LOAD_IMAGES_PER_WORKER = 4
_EWMA = 0.2  # weight of the newest batch time in the per-batch-size estimate
_FINISH_LOCK = threading.Lock()  # a request is finished once: by its worker, or failed at shutdown


@dataclass
class BatchResult:
    """One request's rows of a batch, and how it ran."""

    probabilities: np.ndarray
    queue_s: float  # arrival -> the batch started
    compute_s: float  # the whole batch's inference time
    batch_size: int  # images in the executed batch


class Pending:
    """A submitted request: `result(timeout)` blocks until its batch ran (or failed)."""

    __slots__ = ("batch", "size", "shape", "deadline", "arrival", "cancelled", "alone", "company", "_done",
                 "_waiter", "_result", "_error")

    def __init__(self, batch: np.ndarray, deadline: float | None):
        self.batch = batch
        self.size = int(batch.shape[0])
        self.shape = tuple(batch.shape[1:])
        self.deadline = deadline
        self.arrival = time.monotonic()
        self.cancelled = False
        self.alone = False  # arrived while nothing else was outstanding
        self.company = 0  # arrived first after a batch of this many images: their clients are coming back
        self._done = False
        # held until the request is finished: waiting is acquiring it (a bare lock: one wake-up, no
        # Condition machinery, on the path every request takes twice)
        self._waiter = threading.Lock()
        self._waiter.acquire()
        self._result: BatchResult | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """The caller no longer wants the result: if still queued, it is not run."""
        self.cancelled = True

    def _finish(self, result: BatchResult | None = None, error: BaseException | None = None) -> bool:
        """Set the outcome once (True); a later call (a worker finishing after shutdown failed it) is ignored."""
        with _FINISH_LOCK:
            if self._done:
                return False
            self._result, self._error = result, error
            self._done = True
        self._waiter.release()
        return True

    def result(self, timeout: float | None = None) -> BatchResult:
        """Wait for the result; gives up at the request's deadline (or `timeout`), and the request is then not run."""
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        if not self._done and not self._wait(timeout):
            self.cancelled = True
            raise DeadlineExceededError(
                f"request for {self.size} image(s) did not finish within its deadline "
                f"(waited {time.monotonic() - self.arrival:.3f} s)"
            )
        if self._error is not None:
            raise self._error
        return self._result

    def _wait(self, timeout: float | None) -> bool:
        """Block until finished (True) or `timeout` seconds passed (False); any number of waiters."""
        if not self._waiter.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return self._done
        self._waiter.release()  # let other waiters (and later calls) through
        return True


class _ErrorLog:
    """Logs each distinct failure message once, then at most once per `every_s` with how many were not logged."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, keep: int = 64):
        self.logger, self.every_s, self.keep = logger, every_s, keep
        self._seen: dict[str, list] = {}  # message -> [last logged (monotonic), not logged since]
        self._lock = threading.Lock()

    def error(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(message)
            if seen is not None and now - seen[0] < self.every_s:
                seen[1] += 1
                return
            skipped = seen[1] if seen is not None else 0
            if seen is None and len(self._seen) >= self.keep:
                self._seen.pop(next(iter(self._seen)))
            self._seen[message] = [now, 0]
        more = f" ({skipped} more like it in the last {self.every_s:.0f} s)" if skipped else ""
        self.logger.error("%s%s", message, more)


class _BatchTimes:
    """Measured batch times per batch size (moving averages), and the wait they predict."""

    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self._times: dict[int, float] = {}

    def observe(self, size: int, seconds: float) -> None:
        old = self._times.get(size)
        self._times[size] = seconds if old is None else old + _EWMA * (seconds - old)

    def time(self, size: int) -> float | None:
        """Expected seconds for a batch of `size`: measured, interpolated, or scaled up from the largest
        smaller size measured (an overestimate until bigger batches run); None before any batch ran."""
        times = self._times
        if not times:
            return None
        if size in times:
            return times[size]
        below = [s for s in times if s < size]
        above = [s for s in times if s > size]
        if below and above:
            lo, hi = max(below), min(above)
            return times[lo] + (times[hi] - times[lo]) * (size - lo) / (hi - lo)
        if above:
            return times[min(above)]
        lo = max(below)
        return times[lo] * size / lo

    def wait(self, images: int, workers: int) -> float | None:
        """Seconds until `images` queued images have run, in full batches and one partial one."""
        full = self.max_batch_size
        t_full = self.time(full)
        if t_full is None:
            return None
        rest = images % full
        return ((images // full) * t_full + (self.time(rest) if rest else 0.0)) / max(1, workers)


class DynamicBatcher:
    """Queues requests for one runner and executes them in batches (see the module docstring)."""

    def __init__(self, runner: Runner, *, max_batch_size: int | None = None, max_queue_delay_us: int = 0,
                 max_queue_size: int = 0, workers: int = 1, stats=None, idle_fast_path: bool = True,
                 close_runner: bool = False, unhealthy_after_s: float = UNHEALTHY_AFTER_S,
                 error_log: _ErrorLog | None = None):
        self.runner = runner
        self.name = runner.name
        limit = runner.max_batch_size if max_batch_size is None else max_batch_size
        self.max_batch_size = max(1, int(limit or 1))
        self.max_queue_delay_s = max(0, int(max_queue_delay_us)) / 1e6
        self.max_queue_size = max(0, int(max_queue_size))
        self.workers = 1 if not runner.thread_safe else max(1, int(workers), int(runner.preferred_workers))
        self.split = runner.thread_safe and int(runner.preferred_workers) > 1  # workers side by side
        self.stats = stats  # serve.metrics.ModelStats or None
        self.idle_fast_path = idle_fast_path
        self.close_runner = close_runner
        self.unhealthy_after_s = unhealthy_after_s
        self._errors = error_log or _ErrorLog(log)
        self._times = _BatchTimes(self.max_batch_size)
        self._outstanding = 0  # submitted and not yet finished (queued or running)
        self._queue: collections.deque[Pending] = collections.deque()
        self._queued_images = 0
        self._shape_images: dict[tuple, int] = {}  # images queued per image shape
        self._running: set[Pending] = set()  # taken by a worker, not finished yet
        self._running_images = 0
        self._cond = threading.Condition()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._live_workers = 0
        self._stopped = threading.Event()  # every worker has returned (and the runner is closed)
        self._failures = 0  # batches failed in a row
        self._failing_since: float | None = None
        self._last_error = ""
        self._last_batch = (0.0, 0)  # (when, images) of the batch finished last: its clients may come back

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "DynamicBatcher":
        with self._cond:
            if not self._threads and not self._closing:
                for i in range(self.workers):
                    thread = threading.Thread(target=self._work, name=f"batcher-{self.name}-{i}", daemon=True)
                    self._threads.append(thread)
                    self._live_workers += 1
                for thread in self._threads:
                    thread.start()
        return self

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (ServerUnavailableError); queued ones still run."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def close(self, timeout: float | None = None, *, deadline: float | None = None) -> bool:
        """Stop accepting requests, run the ones already queued, stop the workers (True).

        At `deadline` (a time.monotonic() value; or `timeout` seconds from now) whatever is still
        queued or running is failed with ServerUnavailableError and the workers are abandoned
        (False): a worker stuck inside the runner stops when the runner returns, and the runner
        is closed only then."""
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        self.stop_accepting()
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not self._threads:  # never started: nothing runs, the runner can go now
            self._after_workers()
        if not any(t.is_alive() for t in self._threads):
            return True
        self._abandon()
        return False

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until every worker has returned and the runner (with close_runner) is closed."""
        return self._stopped.wait(timeout)

    def _abandon(self) -> None:
        with self._cond:
            queued, running = list(self._queue), list(self._running)
            self._queue.clear()
            self._queued_images = 0
            self._shape_images.clear()
            self._outstanding -= len(queued)
        log.warning("model %s: %d queued and %d running request(s) did not finish before the shutdown deadline; "
                    "they fail with UNAVAILABLE", self.name, len(queued), len(running))
        error = ServerUnavailableError(f"model '{self.name}' shut down before this request finished; retry elsewhere")
        for request in queued + running:
            request._finish(None, error)

    def _after_workers(self) -> None:
        """The last worker returned: close the runner (close_runner) and say the batcher has stopped."""
        if self._stopped.is_set():
            return
        try:
            if self.close_runner:
                self.runner.close()
        except Exception as exc:  # noqa: BLE001 - closing must not raise into a worker or a shutdown
            log.warning("model %s: closing the runner failed: %s: %s", self.name, type(exc).__name__, exc)
        finally:
            self._stopped.set()

    @property
    def queued(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    def health(self) -> str | None:
        """None while the model serves; else why it does not (every batch failing, or a worker gone)."""
        with self._cond:
            if self._threads and self._live_workers < len(self._threads) and not self._closing:
                return f"{len(self._threads) - self._live_workers} batcher worker(s) stopped unexpectedly"
            since = self._failing_since
            if since is not None and self._failures >= 3 and time.monotonic() - since >= self.unhealthy_after_s:
                return (f"every batch failed for the last {time.monotonic() - since:.0f} s "
                        f"({self._failures} batches): {self._last_error}")
        return None

    # ---- requests --------------------------------------------------------------------------
    def submit(self, batch: np.ndarray, deadline: float | None = None, *, checked: bool = False) -> Pending:
        """Queue a batch; returns at once. `deadline` is a time.monotonic() value. `checked`: the
        caller already validated `batch` against the model's input (the data plane does, once)."""
        if not checked:
            batch = self.runner.check(batch)
        if batch.shape[0] > self.max_batch_size:
            raise InvalidInputError(
                f"model '{self.name}': received a batch of {batch.shape[0]}, "
                f"expected at most max_batch_size={self.max_batch_size}"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceededError(f"model '{self.name}': the request's deadline passed before it was queued")
        pending = Pending(batch, deadline)
        with self._cond:
            if self._closing:
                raise ServerUnavailableError(f"model '{self.name}' is shutting down and accepts no new requests")
            if not self._threads:
                raise RuntimeError(f"batcher for '{self.name}' was not started")
            if self.max_queue_size and len(self._queue) >= self.max_queue_size:
                raise ResourceExhaustedError(
                    f"model '{self.name}': queue full ({len(self._queue)} requests waiting, "
                    f"max_queue_size={self.max_queue_size}); retry later"
                )
            if deadline is not None:
                ahead = self._queued_images + self._running_images
                wait = self._times.wait(ahead + pending.size, self.workers)
                if wait is not None and now + wait > deadline:
                    raise ResourceExhaustedError(
                        f"model '{self.name}': expected wait {wait:.2f} s ({ahead} image(s) ahead at the measured "
                        f"batch times) exceeds the request's remaining deadline of {deadline - now:.2f} s; "
                        "retry later or elsewhere"
                    )
            if self._outstanding == 0:
                pending.company = self._company_expected(now)
                pending.alone = not pending.company
            self._outstanding += 1
            self._queue.append(pending)
            self._queued_images += pending.size
            self._shape_images[pending.shape] = self._shape_images.get(pending.shape, 0) + pending.size
            self._cond.notify()
        return pending

    def infer(self, batch: np.ndarray, deadline: float | None = None) -> BatchResult:
        """submit() and wait for the result."""
        return self.submit(batch, deadline).result()

    # ---- worker ----------------------------------------------------------------------------
    def _company_expected(self, now: float) -> int:
        """The images of a batch of several that finished just now (else 0): their clients are coming back,
        and a request arriving while nothing is outstanding is the first of them, not a lone one."""
        finished, images = self._last_batch
        recent = now - finished < max(0.01, 5 * self.max_queue_delay_s)
        return images if images > 1 and recent and self.max_queue_delay_s > 0 else 0

    def _share(self) -> int:
        """The most images the next batch takes (under the lock): max_batch_size, or with workers side by
        side, this worker's share of the images in the model, and one request at light load."""
        if not self.split:
            return self.max_batch_size
        images = self._queued_images + self._running_images
        if images <= LIGHT_LOAD_IMAGES_PER_WORKER * self.workers:
            return 1
        return min(self.max_batch_size, max(1, -(-images // self.workers)))

    def _take(self, returning: int = 0) -> tuple[list[Pending], bool] | None:
        """Block until a batch is due; None when closing with an empty queue. `returning`: images of the batch
        this worker just finished, whose clients may be about to send again."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    returning = 0  # the queue was empty: nobody was waiting to regroup with them
                first = self._queue[0]
                shape = first.shape
                delay = 0.0 if (self.idle_fast_path and first.alone and len(self._queue) == 1) else self.max_queue_delay_s
                if self.split and self._running and not first.company:
                    # another batch runs: this one runs beside it on its own cores, where more images gain
                    # almost nothing (onnxruntime, one core, INT8 mobilenet_v2: 3.64 -> 3.42 ms an image from
                    # batch 1 to 2), so it starts now with what is queued instead of waiting for its share
                    delay = 0.0
                due = first.arrival + delay
                target = cap = self._share()
                if first.company:  # the clients of the last batch, coming back: go as soon as they all did
                    target = min(cap, first.company)
                if returning and delay > 0:
                    # requests queued behind the batch this worker just finished: wait (at most the queue delay,
                    # from now) for that batch's clients to come back and run them all as one batch, instead of
                    # alternating two half batches for ever (4 clients: 2 + 2 -> 4)
                    target = min(cap, self._shape_images.get(shape, 0) + returning)
                    due = max(due, time.monotonic() + delay)
                returning = 0
                while (self._queue and self._queue[0] is first and self._shape_images.get(shape, 0) < target
                       and not self._closing):
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._queue or self._queue[0] is not first:  # another worker took it
                    continue
                cap = self._share()  # more may have come while it waited
                taken, kept, images = [], [], 0
                full = False
                for request in self._queue:
                    if not full and request.shape == shape:
                        if images + request.size <= (cap if images else self.max_batch_size):
                            taken.append(request)
                            images += request.size
                            continue
                        full = True  # keep arrival order within a shape
                    kept.append(request)
                if kept:
                    self._queue = collections.deque(kept)
                else:
                    self._queue.clear()
                self._queued_images -= images
                left_of_shape = self._shape_images[shape] - images
                if left_of_shape:
                    self._shape_images[shape] = left_of_shape
                else:
                    del self._shape_images[shape]
                busy = bool(self._running) or bool(self._queue)  # other batches run or wait meanwhile
                self._running.update(taken)
                self._running_images += images
                if self._queue:
                    self._cond.notify()  # let another worker start on the rest
                return taken, busy

    def _work(self) -> None:
        returning = 0
        try:
            while True:
                took = self._take(returning)
                if took is None:
                    return
                taken, busy = took
                try:
                    outcomes = self._process(taken, busy)
                except BaseException as exc:  # noqa: BLE001 - never strand a request, never lose the worker
                    message = f"model '{self.name}': the batcher failed: {type(exc).__name__}: {exc}"
                    self._errors.error(message)
                    outcomes = [(request, None, BackendError(message)) for request in taken]
                # no longer outstanding *before* the callers wake up: a caller's next request must see an idle model
                with self._cond:
                    self._outstanding -= len(taken)
                    self._running.difference_update(taken)
                    returning = sum(r.size for r in taken)
                    self._running_images -= returning
                    self._last_batch = (time.monotonic(), returning)
                for request, result, error in outcomes:
                    request._finish(result, error)
        finally:
            with self._cond:
                self._live_workers -= 1
                last = self._live_workers == 0
            if last and self._closing:
                self._after_workers()

    def _process(self, taken: list[Pending], busy: bool = False
                 ) -> list[tuple[Pending, BatchResult | None, BaseException | None]]:
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
            outcomes.extend(self._run(live, now, busy))
        return outcomes

    def _run(self, requests: list[Pending], started: float, busy: bool = False
             ) -> list[tuple[Pending, BatchResult | None, BaseException | None]]:
        size = sum(r.size for r in requests)
        try:
            batch = requests[0].batch if len(requests) == 1 else np.concatenate([r.batch for r in requests])
            t0 = time.perf_counter()
            out = self.runner.run(batch, busy)
            compute = time.perf_counter() - t0
            if out.ndim < 1 or out.shape[0] != batch.shape[0]:
                raise RuntimeError(f"returned {out.shape[0] if out.ndim else 'no'} rows for a batch of "
                                   f"{batch.shape[0]}")
            outcomes, row = [], 0
            for request in requests:
                outcomes.append((request, BatchResult(out[row: row + request.size], started - request.arrival,
                                                      compute, size), None))
                row += request.size
            if self.stats:
                self.stats.batch(size, compute, [started - r.arrival for r in requests])
        except Exception as exc:  # every waiting request learns why; the worker goes on
            if isinstance(exc, KestrelError) and not isinstance(exc, BackendError):
                error: BaseException = exc  # the runner's own domain error (e.g. a closed runner): as it is
                message = f"model '{self.name}': batch of {size} failed: {exc}"
            else:
                detail = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
                message = f"model '{self.name}': batch of {size} failed: {detail}"
                error = BackendError(message)
            self._errors.error(message)
            with self._cond:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                self._failures += 1
                self._last_error = message
            return [(request, None, error) for request in requests]
        with self._cond:  # submit() reads the times under this lock (expected-wait admission)
            self._failures, self._failing_since = 0, None
            self._times.observe(size, compute)
        return outcomes
