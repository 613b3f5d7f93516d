"""Count the storage calls this process makes through fsspec's local file system (Ray workers are other
processes: their calls are not counted, so a job run on Ray counts its driver alone).

Only the outermost call counts (``exists`` calling ``info`` is one call), as one request of an object store
would. Each call is recorded with its method and path.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

METHODS = ("_open", "cat_file", "pipe_file", "ls", "info", "exists", "isdir", "isfile", "find", "glob", "walk",
           "mv", "cp_file", "rm", "rm_file", "makedirs", "mkdir", "rmdir", "size", "touch", "created", "modified")  # fmt: skip


@dataclass
class Calls:
    """The recorded calls: ``(method, path)`` in order."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.calls)

    def by_method(self) -> Counter:
        return Counter(method for method, _ in self.calls)

    def paths(self, *methods: str) -> set[str]:
        return {path for method, path in self.calls if not methods or method in methods}


@contextlib.contextmanager
def counting() -> Iterator[Calls]:
    """Record every outermost ``LocalFileSystem`` call made in this process while the block runs."""
    record = Calls()
    depth = threading.local()
    originals = {name: getattr(LocalFileSystem, name) for name in METHODS}

    def wrap(name, method):
        @functools.wraps(method)
        def counted(self, *args, **kwargs):
            level = getattr(depth, "level", 0)
            if level == 0:
                path = args[0] if args else kwargs.get("path", "")
                record.calls.append((name, str(path[0] if isinstance(path, list) and path else path)))
            depth.level = level + 1
            try:
                return method(self, *args, **kwargs)
            finally:
                depth.level = level

        return counted

    for name, method in originals.items():
        setattr(LocalFileSystem, name, wrap(name, method))
    try:
        yield record
    finally:
        for name, method in originals.items():
            setattr(LocalFileSystem, name, method)
