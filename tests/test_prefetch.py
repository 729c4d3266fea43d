"""morphoprof.prefetch: items produced ahead in a thread."""

import time

import pytest

from morphoprof.prefetch import Prefetched


def test_prefetched_reads_ahead_from_the_start_and_stops_on_close():
    """The next shard's batches are read before anyone iterates them; close() ends the
    thread; an error in reading reaches the consumer."""
    read = []

    def items():
        for k in range(10):
            read.append(k)
            yield k

    ahead = Prefetched(items(), depth=2)
    for _ in range(200):
        if len(read) >= 3:
            break
        time.sleep(0.01)
    assert read[:3] == [0, 1, 2]  # two queued, one waiting to be put: nothing iterated yet
    ahead.close()
    assert not ahead._thread.is_alive() and len(read) < 10
    assert list(Prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(Prefetched(broken()))


def test_a_consumer_that_stops_early_stops_the_producer():
    """A consumer that breaks off (a failed write of a crop shard) closes the iterator: the
    producer thread ends instead of waiting forever on a full queue; setup runs first, in
    the producer's thread."""
    import threading

    where = []
    ahead = Prefetched(iter(range(100)), depth=1,
                       setup=lambda: where.append(threading.current_thread()))
    it = iter(ahead)
    assert next(it) == 0
    it.close()
    assert not ahead._thread.is_alive()
    assert where == [ahead._thread]
