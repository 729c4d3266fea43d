"""Produce an iterable's items ahead of their consumer, in a thread.

Reading and decoding images, cutting crops and deflating them release the GIL in PIL, NumPy,
torch and zlib, so a producer thread overlaps them with whatever consumes the items (a
network's forward pass, a compressed write).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Prefetched:
    """``iterable``'s items, produced ``depth`` ahead in a thread started at once (so a caller
    can start the next shard's reading before this one is done). ``setup()``, where given,
    runs first in that thread (e.g. to give its torch operations one thread). An exception in
    the producer is raised to the consumer. ``close()`` (also at the end of iteration, or when
    the consumer stops early and closes the iterator) stops the thread."""

    def __init__(self, iterable: Iterable[Any], depth: int = 2,
                 setup: Callable[[], None] | None = None) -> None:
        self._q: queue.Queue = queue.Queue(depth)
        self._done = object()
        self._stop = threading.Event()

        def produce() -> None:
            try:
                if setup is not None:
                    setup()
                for item in iterable:
                    if self._stop.is_set():
                        return
                    self._q.put((item, None))
            except BaseException as exc:  # handed to the consumer, raised there
                self._q.put((None, exc))
                return
            self._q.put((self._done, None))

        self._thread = threading.Thread(target=produce, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                item, exc = self._q.get()
                if exc is not None:
                    raise exc
                if item is self._done:
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the producer (unblocking it where it waits on a full queue)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                self._thread.join(0.01)
