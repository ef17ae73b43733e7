"""Dynamic batching with the fake backend: batches form, the queue is bounded, deadlines are honoured."""

import threading
import time

import numpy as np
import pytest

from serve.backends.fake import FakeRunner, fake_probabilities
from serve.batching import LIGHT_LOAD_IMAGES_PER_WORKER, DynamicBatcher
from serve.errors import (BackendError, DeadlineExceededError, InvalidInputError, ResourceExhaustedError,
                          ServerUnavailableError)
from serve.metrics import Metrics
from serve.repository import TensorSpec

SPEC = TensorSpec("images", np.uint8, (8, 8, 3))
OUT = TensorSpec("probabilities", np.float32, (5,))


def _runner(**kw) -> FakeRunner:
    return FakeRunner("m", SPEC, OUT, max_batch_size=kw.pop("max_batch_size", 16), **kw).load()


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_concurrent_requests_run_as_one_batch_with_the_right_rows():
    runner = _runner(delay_ms=30)
    stats = Metrics().model("m")
    batcher = DynamicBatcher(runner, max_queue_delay_us=50_000, stats=stats).start()
    inputs = [_images(1 + i % 2, seed=i) for i in range(8)]
    results = [None] * 8

    def call(i):
        results[i] = batcher.infer(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.close()
    for batch, result in zip(inputs, results):  # each caller got its own rows
        np.testing.assert_allclose(result.probabilities, fake_probabilities(batch, 5), rtol=1e-6)
    assert sum(runner.batch_sizes) == sum(len(b) for b in inputs) == 12
    assert len(runner.batch_sizes) < 8  # fewer executions than requests
    assert stats.mean_batch_size > 1
    assert max(r.batch_size for r in results) > 2


def test_batches_never_exceed_max_batch_size():
    runner = _runner(delay_ms=20, max_batch_size=4)
    batcher = DynamicBatcher(runner, max_queue_delay_us=100_000).start()
    pending = [batcher.submit(_images(3, seed=i)) for i in range(5)]
    for p in pending:
        p.result(10)
    batcher.close()
    assert max(runner.batch_sizes) <= 4 and sum(runner.batch_sizes) == 15
    with pytest.raises(InvalidInputError, match="received a batch of 5, expected at most max_batch_size=4"):
        batcher.submit(_images(5))


def test_full_queue_fails_fast_with_resource_exhausted():
    runner = _runner(delay_ms=200, thread_safe=False)
    batcher = DynamicBatcher(runner, max_queue_size=2, max_batch_size=1).start()
    first = batcher.submit(_images(1))
    deadline = time.monotonic() + 2
    while batcher.queued and time.monotonic() < deadline:  # the worker takes the first one
        time.sleep(0.005)
    queued = [batcher.submit(_images(1)), batcher.submit(_images(1))]
    t0 = time.perf_counter()
    with pytest.raises(ResourceExhaustedError, match=r"queue full \(2 requests waiting, max_queue_size=2\)"):
        batcher.submit(_images(1))
    assert time.perf_counter() - t0 < 0.15  # fails at once, does not wait for the 200 ms batch
    for p in [first, *queued]:
        assert p.result(5).probabilities.shape == (1, 5)
    batcher.close()


def test_expired_request_is_not_run():
    runner = _runner(delay_ms=150, thread_safe=False)
    stats = Metrics().model("m")
    batcher = DynamicBatcher(runner, max_batch_size=1, stats=stats).start()
    blocker = batcher.submit(_images(1, seed=1))  # occupies the only worker for 150 ms
    doomed = batcher.submit(_images(1, seed=2), deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceededError):
        doomed.result()
    blocker.result(5)
    follow = batcher.infer(_images(1, seed=3))
    batcher.close()
    assert follow.batch_size == 1
    assert runner.batch_sizes == [1, 1]  # the blocker and the follow-up: the expired one never ran
    with pytest.raises(DeadlineExceededError, match="before it was queued"):
        batcher.submit(_images(1), deadline=time.monotonic() - 1)


def test_not_thread_safe_runner_gets_one_worker():
    assert DynamicBatcher(_runner(thread_safe=False), workers=4).workers == 1
    assert DynamicBatcher(_runner(thread_safe=True), workers=4).workers == 4


class _SideBySide(FakeRunner):
    """A runner that asks for two workers (as onnxruntime's adaptive threads do); each batch waits at a gate
    and records its size and whether the batcher said others run meanwhile."""

    def __init__(self, preferred: int):
        super().__init__("m", SPEC, OUT, max_batch_size=16)
        self.preferred_workers = preferred
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.runs: list[tuple[int, bool]] = []

    def run(self, batch, busy=False):
        self.runs.append((len(batch), busy))
        self.entered.release()
        assert self.gate.wait(10)
        return super().run(batch, busy)


@pytest.mark.parametrize("preferred, batches", [(2, [(6, True), (6, True)]), (1, [(12, False)])])
def test_workers_side_by_side_split_the_queued_images_evenly(preferred, batches):
    """With a runner that prefers two workers, 12 queued requests run as 6 + 6 at once (each worker takes its
    share of the images in the model), not 12 in one narrow batch while the other worker idles; two workers
    from instance_group alone keep the old rule (the biggest batch)."""
    runner = _SideBySide(preferred).load()
    batcher = DynamicBatcher(runner, max_queue_delay_us=1000, workers=2).start()
    assert batcher.workers == 2
    assert 12 > LIGHT_LOAD_IMAGES_PER_WORKER * 2  # above light load: the even split applies
    with batcher._cond:  # the 12 arrive together: no worker looks at the queue before all are in
        pending = [batcher.submit(_images(1, seed=i)) for i in range(12)]
    for _ in batches:
        assert runner.entered.acquire(timeout=10)
    assert not runner.entered.acquire(timeout=0.2)  # nothing else started
    assert sorted(runner.runs) == batches
    runner.gate.set()
    for i, p in enumerate(pending):
        np.testing.assert_allclose(p.result(10).probabilities, fake_probabilities(_images(1, seed=i), 5), rtol=1e-6)
    lone = batcher.submit(_images(1))  # alone: the whole batch, and not busy (onnxruntime: every core)
    assert lone.result(10).batch_size == 1 and runner.runs[-1] == (1, False)
    big = batcher.submit(_images(12))  # one request bigger than its share still runs whole
    assert big.result(10).batch_size == 12
    batcher.close()


@pytest.mark.parametrize("preferred", [2, 1])
def test_side_by_side_workers_take_one_request_at_a_time_at_light_load(preferred):
    """While the model holds at most LIGHT_LOAD_IMAGES_PER_WORKER images per worker, side-by-side workers run
    one request each (on one core a bigger batch gains little per image, and each image would wait for the
    whole batch): 8 queued requests run as 1 + 1 side by side, then one at a time; a request bigger than one
    image still runs whole. Two workers from instance_group keep the biggest batch."""
    runner = _SideBySide(preferred).load()
    batcher = DynamicBatcher(runner, max_queue_delay_us=1000, workers=2).start()
    n = LIGHT_LOAD_IMAGES_PER_WORKER * 2
    with batcher._cond:  # all arrive before any worker looks at the queue
        pending = [batcher.submit(_images(1, seed=i)) for i in range(n - 2)] + [batcher.submit(_images(2, seed=9))]
    started = 2 if preferred == 2 else 1
    for _ in range(started):
        assert runner.entered.acquire(timeout=10)
    assert not runner.entered.acquire(timeout=0.2)  # nothing else started while those run
    if preferred == 2:
        assert runner.runs == [(1, True), (1, True)]
    else:
        assert runner.runs == [(n, False)]
    runner.gate.set()
    sizes = [p.result(10).batch_size for p in pending]
    for i, p in enumerate(pending[:-1]):
        np.testing.assert_allclose(p.result(10).probabilities, fake_probabilities(_images(1, seed=i), 5), rtol=1e-6)
    np.testing.assert_allclose(pending[-1].result(10).probabilities, fake_probabilities(_images(2, seed=9), 5),
                               rtol=1e-6)
    if preferred == 2:
        assert sizes == [1] * (n - 2) + [2] and len(runner.runs) == n - 1
    else:
        assert sizes == [n] * (n - 1)
    batcher.close()


def test_a_worker_starting_beside_a_running_batch_does_not_wait_the_queue_delay():
    """Side by side, a request arriving while another batch runs starts at once in the second worker (its batch
    gains almost nothing from company on its own cores), though its share of the images in the model (5 of 10,
    above light load) is more than is queued and the queue delay is 5 s; with two workers from instance_group
    (no side-by-side split) the same request still waits the queue delay for company."""
    runner = _SideBySide(2).load()
    batcher = DynamicBatcher(runner, max_queue_delay_us=5_000_000, workers=2).start()
    first = batcher.submit(_images(9))  # alone: runs at once, on every core
    assert 9 + 1 > LIGHT_LOAD_IMAGES_PER_WORKER * 2  # the share is 5, not light load's one request
    assert runner.entered.acquire(timeout=10) and runner.runs == [(9, False)]
    t0 = time.monotonic()
    second = batcher.submit(_images(1, seed=1))
    assert runner.entered.acquire(timeout=2), "the second worker waited for company beside a running batch"
    assert time.monotonic() - t0 < 2 and runner.runs[-1] == (1, True)
    runner.gate.set()
    assert first.result(10).batch_size == 9 and second.result(10).batch_size == 1
    batcher.close()

    plain = _SideBySide(1).load()  # two workers from instance_group: the queue delay still applies
    batcher = DynamicBatcher(plain, max_queue_delay_us=300_000, workers=2).start()
    with batcher._cond:  # both queued before any worker looks: the first batch waits for nobody
        pending = [batcher.submit(_images(1, seed=i)) for i in range(2)]
    assert plain.entered.acquire(timeout=10)
    t0 = time.monotonic()
    late = batcher.submit(_images(1, seed=5))
    assert not plain.entered.acquire(timeout=0.1)  # waiting for company, not started
    assert plain.entered.acquire(timeout=10) and time.monotonic() - t0 >= 0.25
    plain.gate.set()
    assert [p.result(10).batch_size for p in pending] == [2, 2] and late.result(10).queue_s >= 0.25
    batcher.close()


def test_idle_model_does_not_wait_for_company():
    batcher = DynamicBatcher(_runner(), max_queue_delay_us=500_000).start()
    t0 = time.perf_counter()
    result = batcher.infer(_images(1))
    elapsed = time.perf_counter() - t0
    batcher.close()
    assert elapsed < 0.25 and result.queue_s < 0.25  # not the 500 ms delay
    waiting = DynamicBatcher(_runner(), max_queue_delay_us=100_000, idle_fast_path=False).start()
    assert waiting.infer(_images(1)).queue_s >= 0.09  # Triton's behaviour when asked
    waiting.close()


def test_bad_batches_are_refused_before_queueing():
    batcher = DynamicBatcher(_runner(), max_queue_delay_us=0).start()
    with pytest.raises(InvalidInputError, match="empty batch"):
        batcher.submit(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="received dtype float32, expected uint8"):
        batcher.submit(np.zeros((1, 8, 8, 3), np.float32))
    assert batcher.infer(_images(2)).probabilities.shape == (2, 5)
    batcher.close()


def test_close_drains_queued_requests_then_refuses_new_ones():
    runner = _runner(delay_ms=30, thread_safe=False)
    batcher = DynamicBatcher(runner, max_batch_size=1).start()
    pending = [batcher.submit(_images(1, seed=i)) for i in range(3)]
    batcher.close()
    assert all(p.done() and p.result().probabilities.shape == (1, 5) for p in pending)
    with pytest.raises(ServerUnavailableError, match="shutting down"):  # UNAVAILABLE: retry on another server
        batcher.submit(_images(1))


# ---- faults: every request taken is finished, the worker lives on ----------------------------------------
class _Gate:
    """A runner's _infer that blocks until the test opens the gate (records each batch's shape)."""

    def __init__(self, runner):
        self.shapes, self.open, self.entered = [], threading.Event(), threading.Event()
        original = runner._infer

        def infer(batch):
            self.shapes.append(tuple(batch.shape))
            self.entered.set()
            assert self.open.wait(10)
            return original(batch)

        runner._infer = infer


def test_requests_of_different_image_shapes_are_never_concatenated():
    runner = FakeRunner("dyn", TensorSpec("images", np.uint8, (-1, -1, 3)), OUT, max_batch_size=8).load()
    gate = _Gate(runner)
    batcher = DynamicBatcher(runner, max_queue_delay_us=0, workers=1).start()
    first = batcher.submit(np.zeros((1, 10, 10, 3), np.uint8))
    assert gate.entered.wait(5)  # the worker is busy: the next ones queue up together
    small = [batcher.submit(np.full((1, 10, 10, 3), i, np.uint8)) for i in range(3)]
    large = [batcher.submit(np.full((1, 12, 10, 3), i, np.uint8)) for i in range(2)]
    gate.open.set()
    for p, size in zip(small + large, [10] * 3 + [12] * 2):
        out = p.result(5).probabilities
        np.testing.assert_allclose(out, fake_probabilities(p.batch, 5), rtol=1e-6)
    first.result(5)
    batcher.close()
    assert gate.shapes == [(1, 10, 10, 3), (3, 10, 10, 3), (2, 12, 10, 3)]  # one batch per shape


def test_a_failure_outside_the_runner_fails_its_batch_and_the_worker_goes_on(caplog):
    class BrokenStats:
        def batch(self, *args):
            raise ZeroDivisionError("a bug in the statistics")

        def expired(self):
            pass

    runner = _runner()
    batcher = DynamicBatcher(runner, stats=BrokenStats()).start()
    for _ in range(3):
        with pytest.raises(BackendError, match="batch of 1 failed: ZeroDivisionError: a bug in the statistics"):
            batcher.infer(_images(1))
    assert all(t.is_alive() for t in batcher._threads)
    batcher.stats = None
    assert batcher.infer(_images(2)).probabilities.shape == (2, 5)  # the same worker serves the next batch
    batcher.close()
    logged = [r for r in caplog.records if "a bug in the statistics" in r.getMessage()]
    assert len(logged) == 1  # once per distinct message, not once per batch


def test_a_model_failing_on_every_batch_for_a_while_reports_it_and_recovers_on_success():
    runner = _runner(fail_infer="down")
    batcher = DynamicBatcher(runner, unhealthy_after_s=0.2).start()
    assert batcher.health() is None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.3:
        with pytest.raises(BackendError):
            batcher.infer(_images(1))
    assert "every batch failed" in batcher.health() and "down" in batcher.health()
    runner.fail_infer = None
    batcher.infer(_images(1))
    assert batcher.health() is None
    batcher.close()


def test_close_at_its_deadline_fails_what_is_held_and_closes_the_runner_only_after_the_worker_left():
    runner = _runner(thread_safe=False)
    gate = _Gate(runner)
    batcher = DynamicBatcher(runner, max_batch_size=1, close_runner=True).start()
    running = batcher.submit(_images(1))
    assert gate.entered.wait(5)
    queued = batcher.submit(_images(1, seed=1))
    t0 = time.monotonic()
    assert batcher.close(deadline=time.monotonic() + 0.2) is False  # the worker is stuck in the model
    assert time.monotonic() - t0 < 1.0
    for pending in (running, queued):
        with pytest.raises(ServerUnavailableError, match="shut down before this request finished"):
            pending.result(1)
    assert runner.loaded  # not closed while the worker is inside it
    gate.open.set()
    assert batcher.wait_stopped(5)
    assert not runner.loaded and runner.closed
    with pytest.raises(ServerUnavailableError, match="does not run any more"):
        runner.infer(_images(1))  # a closed runner never loads again


def test_a_runner_left_by_a_with_block_may_load_again():
    runner = FakeRunner("m", SPEC, OUT)
    with runner:
        runner.infer(_images(1))
    assert not runner.loaded and not runner.closed
    assert runner.infer(_images(1)).shape == (1, 5)


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once():
    runner = _runner(delay_ms=50, thread_safe=False, max_batch_size=2)
    batcher = DynamicBatcher(runner, max_batch_size=2).start()
    early = batcher.submit(_images(1), deadline=time.monotonic() + 0.01)  # nothing measured yet: queued
    with pytest.raises(DeadlineExceededError):
        early.result()
    deadline = time.monotonic() + 5
    while batcher._outstanding and time.monotonic() < deadline:
        time.sleep(0.005)
    batcher.infer(_images(2))  # a full batch: ~50 ms measured
    with pytest.raises(ResourceExhaustedError, match="exceeds the request's remaining deadline"):
        batcher.submit(_images(1), deadline=time.monotonic() + 0.02)
    assert batcher.infer(_images(1), deadline=time.monotonic() + 5).probabilities.shape == (1, 5)
    batcher.close()


def test_the_clients_of_a_batch_coming_back_regroup_instead_of_alternating_half_batches():
    """4 closed-loop clients on a 30 ms model: after the start, every batch holds all 4 (not 2 + 2), while a
    lone client still takes the idle fast path."""
    runner = _runner(delay_ms=30, thread_safe=False, max_batch_size=8)
    batcher = DynamicBatcher(runner, max_queue_delay_us=5000).start()
    stop = threading.Event()

    def client(seed):
        while not stop.is_set():
            batcher.infer(_images(1, seed=seed))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(runner.batch_sizes) < 14 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join(10)
    steady = runner.batch_sizes[4:14]
    assert steady.count(4) >= 8, runner.batch_sizes  # regrouped (before: 2, 2, 2, 2, ...)
    runner.batch_sizes.clear()
    batcher._last_batch = (time.monotonic() - 1.0, 4)  # long idle: the next request is a lone one
    lone = batcher.submit(_images(1))
    assert lone.alone and lone.company == 0
    lone.result(5)
    batcher._last_batch = (time.monotonic(), 3)  # a batch of 3 just finished: its clients are coming back
    first_back = batcher.submit(_images(1))
    assert not first_back.alone and first_back.company == 3
    first_back.result(5)
    batcher.close()


def test_batch_times_are_recorded_under_the_lock_submit_reads_them_with():
    """submit() reads the measured batch times (expected-wait admission) under the batcher's lock; a worker
    recording a new batch size outside it could change the dict while a submit iterates over it."""
    batcher = DynamicBatcher(_runner(), max_batch_size=16, max_queue_delay_us=0).start()
    observed, original = [], batcher._times.observe

    def observe(size, seconds):
        observed.append(batcher._cond._is_owned())
        original(size, seconds)

    batcher._times.observe = observe
    try:
        batcher.infer(_images(2), deadline=time.monotonic() + 10)
    finally:
        batcher.close()
    assert observed == [True]
