"""A local Ray for one benchmark phase: 2 CPUs (the development machine), quiet logs, no progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def local_ray(**init_options: Any) -> Iterator[None]:
    """``ray.init`` on this machine for the ``with`` block, ``ray.shutdown`` after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             **init_options)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
