"""Dynamic batching with the fake backend: batches form, the queue is bounded, deadlines are honoured."""

import threading
import time

import numpy as np
import pytest

from serve.backends.fake import FakeRunner, fake_probabilities
from serve.batching import DynamicBatcher
from serve.errors import DeadlineExceededError, InvalidInputError, ResourceExhaustedError
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
    with pytest.raises(ResourceExhaustedError, match="shutting down"):
        batcher.submit(_images(1))
