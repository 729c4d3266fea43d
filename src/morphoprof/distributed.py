"""Dask distributed for sharded stages: one task per shard (a plate, or a chunk of its rows).

``--scheduler local:N`` starts a LocalCluster of N single-threaded worker processes on 127.0.0.1;
``--scheduler tcp://HOST:PORT`` (or ``tls://``) uses a running cluster (``dask-scheduler`` +
``dask-worker``, dask-jobqueue on SLURM / PBS, dask-kubernetes...). Every task writes its own
Parquet shard (atomically, under a temporary name) and returns its row count and checksum; the
client records finished shards in the manifest as they complete, so a killed run resumes with the
shards it had and recomputes the rest. Workers need the image files and the output folder at the
same paths (a shared filesystem).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from morphoprof.errors import InputError
from morphoprof.extras import require


def parse_scheduler(spec: str) -> tuple[str, int | str]:
    """``local:N`` -> ("local", N); ``tcp://host:port`` / ``tls://...`` -> ("address", spec)."""
    spec = str(spec).strip()
    if spec.startswith("local"):
        _, _, n = spec.partition(":")
        try:
            workers = int(n) if n else 2
        except ValueError:
            workers = 0
        if workers < 1:
            raise InputError(f"--scheduler {spec!r}: expected local:N with N >= 1 workers")
        return "local", workers
    if spec.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        return "address", spec
    raise InputError(f"--scheduler {spec!r}: expected local:N or a scheduler address "
                     "(tcp://HOST:PORT)")


@contextmanager
def dask_client(spec: str) -> Iterator[Any]:
    """A ``distributed.Client`` for ``spec`` (see :func:`parse_scheduler`); a LocalCluster it
    started is closed on exit. A scheduler address that does not answer within Dask's connect
    timeout (``distributed.comm.timeouts.connect``) is an InputError."""
    require("distributed")
    from distributed import Client, LocalCluster
    kind, value = parse_scheduler(spec)
    if kind == "local":
        cluster = LocalCluster(n_workers=int(value), threads_per_worker=1, processes=True,
                               host="127.0.0.1", dashboard_address=None,
                               silence_logs=40)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    import dask

    try:
        # Dask's own connect timeout (30 s; DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT sets it)
        client = Client(str(value),
                        timeout=dask.config.get("distributed.comm.timeouts.connect", "30s"))
    except OSError as exc:
        raise InputError(f"cannot reach the Dask scheduler at {value}: {exc}") from exc
    try:
        yield client
    finally:
        client.close()
