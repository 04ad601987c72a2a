"""Private bytes that ``ssl`` must read from a path, without leaving them on disk.

Python's ``ssl`` loads certificate chains and private keys only from file paths. An X.509-SVID's key
is short-lived and must never outlive the process on disk (not in /tmp, not after SIGKILL). On Linux
the bytes go into an anonymous memory file (``memfd_create``): its path ``/proc/self/fd/N`` is
readable by this process only, while the descriptor is open, and the memory is freed when it closes
or the process dies. Elsewhere, a file in a private (0700) temporary directory removed on close is
the fallback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType


class MemoryFile:
    """``data`` readable at :attr:`path` until :meth:`close` (or garbage collection) releases it.

    The path is valid in this process only (``/proc/self/fd`` is per process).
    """

    def __init__(self, data: bytes, name: str = "sts") -> None:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            self.path = f"/proc/self/fd/{fd}"
            self._release: Callable[[], object] = weakref.finalize(self, os.close, fd)
            return
        directory = tempfile.mkdtemp(prefix="sts-")  # mode 0700
        path = Path(directory) / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
        self.path = str(path)
        self._release = weakref.finalize(self, _remove_tree, directory)

    def close(self) -> None:
        """Release the bytes now (idempotent); the path is invalid afterwards."""
        self._release()

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _remove_tree(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
