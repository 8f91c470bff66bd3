"""An ordered map over worker processes with a bounded number of tasks in flight (bounded memory)."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
IN_FLIGHT_PER_WORKER = 8


def ordered_map(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    workers: int,
    in_flight_per_worker: int = IN_FLIGHT_PER_WORKER,
) -> Iterator[R]:
    """fn(task) for each task, results in task order; `workers` = 0 runs in this process.

    At most workers x in_flight_per_worker tasks are submitted and not yet consumed, so memory
    does not grow with the number of tasks. Workers are started with 'spawn' (no fork of a process
    that may hold threads) and import only the modules `fn` needs; a worker that dies raises
    BrokenProcessPool here instead of hanging, and stopping early cancels what is queued.
    """
    if workers <= 0:
        yield from map(fn, tasks)
        return
    window = max(1, workers * in_flight_per_worker)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
