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
