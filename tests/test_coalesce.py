import os
import signal
import threading

import numpy as np
import pytest

from model import Predictor
from model.coalesce import Coalescer
from model.settings import DEFAULT_CHECKPOINT


class GatedRun:
    """A ``run`` whose first batch holds until released, so that callers queue behind it."""

    def __init__(self):
        self.batches = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.started.set()
            assert self.release.wait(10)
        return [ValueError(f"bad {item}") if item < 0 else item * 10 for item in items]


def start_callers(call, keys, outcomes):
    """One thread per key, each storing what ``call(key)`` returned or raised under its key."""
    def caller(key):
        try:
            outcomes[key] = call(key)
        except Exception as error:  # noqa: BLE001 - the test reads what each caller got
            outcomes[key] = error

    threads = [threading.Thread(target=caller, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    return threads


def submit_all(coalescer, items, outcomes):
    return start_callers(coalescer.submit, items, outcomes)


def wait_until_queued(coalescer, count):
    for _ in range(1000):
        with coalescer._lock:
            if len(coalescer._queue) == count:
                return
        threading.Event().wait(0.005)
    raise AssertionError(f"{count} callers never queued")


def test_a_lone_call_runs_at_once_as_a_batch_of_one():
    batches = []
    coalescer = Coalescer(lambda items: batches.append(list(items)) or [i + 1 for i in items])
    assert coalescer.submit(1) == 2
    assert coalescer.submit(5) == 6
    assert batches == [[1], [5]]


def test_calls_arriving_while_a_batch_runs_share_the_next_one_and_each_gets_its_own_answer():
    run = GatedRun()
    coalescer = Coalescer(run, max_batch=3)
    outcomes = {}
    first = submit_all(coalescer, [1], outcomes)
    assert run.started.wait(10)
    later = submit_all(coalescer, [2, 3, 4, -5], outcomes)
    wait_until_queued(coalescer, 4)
    run.release.set()
    for thread in first + later:
        thread.join(10)
    assert run.batches[0] == [1]
    assert sorted(run.batches[1] + run.batches[2]) == [-5, 2, 3, 4] and len(run.batches[1]) == 3
    assert [outcomes[i] for i in (1, 2, 3, 4)] == [10, 20, 30, 40]
    assert isinstance(outcomes[-5], ValueError) and str(outcomes[-5]) == "bad -5"  # its caller alone


def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs():
    calls = []

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return list(items)

    coalescer = Coalescer(run)
    with pytest.raises(RuntimeError, match="out of memory"):
        coalescer.submit(1)
    assert coalescer.submit(2) == 2


def test_a_forked_child_starts_with_an_empty_queue():
    run = GatedRun()
    coalescer = Coalescer(run)
    threads = submit_all(coalescer, [1], {})
    assert run.started.wait(10)  # the parent is mid-batch, its lock state and queue copied by a fork
    pid = os.fork()
    if pid == 0:  # the child: no thread will ever finish the parent's batch here
        signal.alarm(20)  # were it to wait for that batch, it dies instead of hanging the test
        os._exit(0 if Coalescer.submit(coalescer, 7) == 70 else 1)
    run.release.set()
    _, status = os.waitpid(pid, 0)
    for thread in threads:
        thread.join(10)
    assert os.waitstatus_to_exitcode(status) == 0


def test_predictions_that_share_a_batch_match_those_made_one_at_a_time():
    predictor = Predictor.from_path(DEFAULT_CHECKPOINT)
    rng = np.random.default_rng(3)
    films = [(rng.random((300, 360)) * 255).astype(np.uint8) for _ in range(6)]
    alone = [predictor.predict(film) for film in films]
    coalescer, run, batches = predictor._coalescer, predictor._coalescer._run, []

    def gated(items):  # the first film's batch holds until the other five queue behind it
        if not batches:
            wait_until_queued(coalescer, len(films) - 1)
        batches.append(len(items))
        return run(items)

    coalescer._run = gated
    together: dict = {}
    first = start_callers(lambda i: predictor.predict(films[i]), [0], together)
    wait_until_running(coalescer)
    rest = start_callers(lambda i: predictor.predict(films[i]), range(1, len(films)), together)
    for thread in first + rest:
        thread.join(30)
    assert batches == [1, 5]  # the five went through the batched path, the first through the single one
    for i, a in enumerate(alone):
        b = together[i]
        assert b.probability == pytest.approx(a.probability, abs=1e-5)
        assert (a.label, a.population_reasons) == (b.label, b.population_reasons)
        assert np.allclose(a.features, b.features, atol=1e-4)


def wait_until_running(coalescer):
    for _ in range(1000):
        with coalescer._lock:
            if coalescer._running:
                return
        threading.Event().wait(0.005)
    raise AssertionError("the first call never ran")
