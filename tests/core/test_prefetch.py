import random
import threading
import time

import pytest

from quantize.core.prefetch import prefetch, thread_pool


def pool_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


def test_results_come_in_item_order_whatever_order_they_finish_in():
    def slow_square(i):
        time.sleep(random.uniform(0, 0.01))
        return i * i

    assert list(prefetch(slow_square, range(40), workers=4, ahead=6)) == [i * i for i in range(40)]
    assert list(prefetch(slow_square, [], workers=4, ahead=6)) == []


def test_takes_at_most_ahead_items_beyond_what_was_consumed():
    taken, in_flight = [], []

    def items():
        for i in range(30):
            taken.append(i)
            yield i

    for consumed, _ in enumerate(prefetch(lambda i: i, items(), workers=3, ahead=5), 1):
        in_flight.append(len(taken) - consumed)
        time.sleep(0.002)  # a slow consumer: the workers would run ahead if nothing bounded them
    assert max(in_flight) == 5 and in_flight[-1] == 0 and len(taken) == 30


def test_an_error_of_the_work_reaches_the_consumer_after_the_results_before_it():
    def work(i):
        if i == 3:
            raise ValueError("item 3 is bad")
        return i

    results = prefetch(work, range(100), workers=2, ahead=4, name="failing")
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(results)
    assert not pool_threads("failing")


def test_closing_early_cancels_pending_work_and_stops_the_pool():
    started, release = [], threading.Event()

    def work(i):
        started.append(i)
        if i > 0:
            release.wait(5)
        return i

    results = prefetch(work, range(10), workers=1, ahead=6, name="early")
    assert next(results) == 0
    while len(started) < 2:  # item 1 is running; items 2-5 wait in the queue
        time.sleep(0.001)
    threading.Timer(0.2, release.set).start()  # lets item 1 finish while close() waits for it
    results.close()
    assert started == [0, 1]  # items 2-5 were cancelled, not run
    assert not pool_threads("early")


def test_a_pool_block_left_by_an_error_cancels_what_has_not_started():
    ran, running, release = [], threading.Event(), threading.Event()

    def work(i):
        running.set()
        release.wait(5)
        ran.append(i)

    with pytest.raises(RuntimeError):
        with thread_pool(1, "block") as pool:
            futures = [pool.submit(work, i) for i in range(5)]
            running.wait(5)
            threading.Timer(0.2, release.set).start()
            raise RuntimeError("the consumer failed")
    assert ran == [0] and all(f.cancelled() for f in futures[1:])
    assert not pool_threads("block")


def test_ahead_must_be_positive():
    with pytest.raises(ValueError, match="ahead"):
        next(prefetch(lambda i: i, range(3), workers=1, ahead=0))
