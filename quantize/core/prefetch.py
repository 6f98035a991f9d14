"""Thread pools that never outlive their work: one prefetch loop and one way to shut a pool down."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@contextmanager
def thread_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads. However the block ends (done, an error, a generator closed early), work not
    yet started is cancelled and work already running is waited for, so no thread outlives the block."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prefetch(work: Callable[[Item], Result], items: Iterable[Item], workers: int, ahead: int,
             name: str = "prefetch") -> Iterator[Result]:
    """``work(item)`` for every item, in the items' order, computed by ``workers`` threads.

    At most ``ahead`` items are taken from ``items`` and not yet handed to the consumer, so memory stays bounded
    however long ``items`` is. An exception of ``work`` reaches the consumer in order, after the results before it;
    one of ``items`` as soon as it is raised. The pool starts on the first ``next()`` and stops when the consumer
    finishes, raises or closes the iterator: pending work is cancelled then.
    """
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    source = iter(items)
    with thread_pool(workers, name) as pool:
        pending: deque[Future] = deque(pool.submit(work, item) for item in itertools.islice(source, ahead))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(work, item) for item in itertools.islice(source, 1))
            yield result
