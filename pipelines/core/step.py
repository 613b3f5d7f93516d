"""The Step contract: one batch transform with one frozen config, declared columns, one model per actor.

A step is a callable class ``Step(config)(batch) -> batch`` over ``dict[str, np.ndarray]``. It never
imports Ray, so it is unit-testable on a plain dict. ``pipelines.core.plan`` is the only place that maps steps
onto ``ray.data.Dataset.map_batches``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from schemas.columns import REJECT_COLUMNS, REJECT_DETAIL, REJECT_REASON, REJECT_STEP

Batch = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class Resources:
    """How a step runs on the cluster. Explicit, from config; never sniffed on the driver.

    Attributes:
        num_cpus: CPUs per task or actor.
        num_gpus: GPUs per task or actor (fractions allowed).
        concurrency: actors in the pool (model steps) or the cap on parallel tasks (others).
        batch_size: rows per batch handed to the step.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int = 1
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus={self.num_cpus} and num_gpus={self.num_gpus} must be >= 0")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


class Step:
    """Base class of every pipeline step.

    Subclasses set ``name``, ``requires`` and ``produces`` and, when they hold a model, ``stateful = True``
    (Ray then runs them in an actor pool so the model loads once per actor, in ``__init__``).
    """

    name: ClassVar[str] = "step"
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    stateful: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def required_columns(cls, config: Any) -> tuple[str, ...]:
        """Columns this step needs with this config (``requires`` unless the config adds some)."""
        return cls.requires

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError


def with_reject_columns(batch: Batch) -> Batch:
    """Add empty reject columns to a batch that does not have them yet."""
    n = batch_size(batch)
    for column in REJECT_COLUMNS:
        if column not in batch:
            batch[column] = np.full(n, "", dtype=object)
    return batch


def batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def healthy(batch: Batch) -> np.ndarray:
    """Indices of the rows no earlier step has rejected."""
    reasons = batch.get(REJECT_REASON)
    if reasons is None:
        return np.arange(batch_size(batch))
    return np.flatnonzero(np.asarray([not r for r in reasons]))


def reject(batch: Batch, row: int, step: str, reason: str, detail: str = "") -> None:
    """Mark one row as rejected by ``step`` with a short ``reason`` and a free-form ``detail``."""
    with_reject_columns(batch)
    batch[REJECT_STEP][row] = step
    batch[REJECT_REASON][row] = reason
    batch[REJECT_DETAIL][row] = detail[:2000]


def object_column(values: Iterable[Any]) -> np.ndarray:
    """A 1-D object array (strings, bytes, ragged values) that numpy will not try to broadcast."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def concat_batches(batches: list[Batch]) -> Batch:
    """Concatenate batches with the same columns (an empty list gives an empty dict)."""
    if not batches:
        return {}
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}
