import errno

from morphoprof.errors import os_reason


def test_os_reason_says_what_happened_without_library_noise():
    """The reason a user reads after ``cannot write <file>:`` for the ways libraries report a
    full disk: the OS's own (errno 28), Arrow's errno text, numpy's short write (``tofile``)."""
    assert os_reason(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"
    arrow = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert os_reason(arrow) == "No space left on device"
    short = OSError("196608 requested and 152544 written")
    assert os_reason(short) == "No space left on device (196608 requested and 152544 written)"
    h5py = OSError(errno.ENOSPC, "Can't synchronously write data (file write failed:\n...)")
    assert os_reason(h5py) == "No space left on device"
    assert os_reason(OSError("something else")) == "something else"


def test_every_error_crosses_a_process_boundary_and_pool_jobs_fail_in_their_order():
    """Errors pickle as they were made (a worker process's ImageReadError used to break
    joblib's pool with "a result has failed to un-serialize"); ``outcome`` hands a job's
    error back so that the first job's, not the fastest worker's, is raised."""
    import pickle

    from joblib import Parallel, delayed

    from morphoprof.errors import (
        ConfigError,
        ImageReadError,
        InputError,
        OutputError,
        ValidationError,
        outcome,
    )

    for exc in (OutputError("/out/x.parquet", "No space left on device"),
                ImageReadError("/data/a b.tif", "truncated file"),
                ValidationError("index.csv", ["row 3: no plate"] * 30, max_shown=2),
                ConfigError("run.yaml", ["data.path: missing"]), InputError("row 7")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert vars(back) == vars(exc)
    results = Parallel(n_jobs=2)(delayed(outcome)(_fails_from_two, k) for k in range(4))
    assert [r for r, _ in results] == [0, 1, None, None]
    errors = [e for _, e in results if e is not None]
    assert [type(e) for e in errors] == [ImageReadError] * 2
    assert str(errors[0]) == "cannot read image field2.tif: truncated"


def _fails_from_two(k: int) -> int:
    from morphoprof.errors import ImageReadError

    if k >= 2:
        raise ImageReadError(f"field{k}.tif", "truncated")
    return k
