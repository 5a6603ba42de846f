"""Calls that arrive together from several threads, run together as one batch.

A gunicorn worker serves several requests at once on threads. Each decodes its own
upload (the decoders release the GIL); the network then costs less per film in a
batch than one film at a time, so the films that are ready while a batch runs wait
for it to end and go through the next one together.

No thread of its own, and no waiting on purpose: the first caller that finds nothing
running leads, runs what is queued (its own item first among them) and hands the lead
to the next caller in the queue. A lone caller runs at once, as without this class;
batches form only from calls that arrive while one is running. Forking (gunicorn
loads the app before it forks its workers) leaves a fresh, empty queue in the child.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Slot:
    __slots__ = ("item", "ready", "result", "error", "lead")

    def __init__(self, item):
        self.item = item
        self.ready = threading.Event()  # set when the result is in, or when this caller is to lead
        self.result = None
        self.error: BaseException | None = None
        self.lead = False


class Coalescer(Generic[Item, Result]):
    """``submit(item)`` from any thread; ``run(items)`` sees up to ``max_batch`` at once.

    ``run`` returns one result per item, in order; a result that is an exception is
    raised in that item's caller alone. An exception out of ``run`` itself is raised in
    every caller of that batch, and the next batch runs as usual.
    """

    def __init__(self, run: Callable[[Sequence[Item]], list], max_batch: int = 8):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._queue: deque[_Slot] = deque()
        self._running = False

    def submit(self, item: Item) -> Result:
        if self._pid != os.getpid():  # a forked child: the parent's threads and queue are not ours
            self._reset()
        slot = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            slot.lead = not self._running
            self._running = True
        if not slot.lead:
            slot.ready.wait()
        if slot.lead:  # from the start, or handed over by the leader before us
            self._lead()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _lead(self) -> None:
        """Run the head of the queue (the leader's own slot is its first), then pass the lead on."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        try:
            results = self._run([slot.item for slot in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run returned {len(results)} results for {len(batch)} items")
            for slot, result in zip(batch, results):
                if isinstance(result, BaseException):
                    slot.error = result
                else:
                    slot.result = result
        except BaseException as error:  # the callers of this batch hear of it; the queue goes on
            for slot in batch:
                slot.error = error
        finally:
            with self._lock:
                following = self._queue[0] if self._queue else None
                if following is not None:
                    following.lead = True
                else:
                    self._running = False
            for slot in batch:
                slot.lead = False
                slot.ready.set()
            if following is not None:
                following.ready.set()
