"""Plans: an ordered list of steps whose column flow and configs are checked before any Ray task runs.

``map_step`` is the only place a step becomes ``Dataset.map_batches``: model steps run in an actor pool
(the model loads once per actor), the others as tasks; CPU/GPU resources and concurrency come from the
step's ``Resources``, never from the driver's hardware.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.core.step import Batch, Resources, Step, concat_batches, with_reject_columns
from schemas.columns import REJECT_COLUMNS

if TYPE_CHECKING:
    import ray.data


TASK_MAX_RETRIES = 3


class PlanError(ValueError):
    """A plan that cannot run: a missing column or a bad step config, found before any Ray work."""


@dataclass(frozen=True)
class PlannedStep:
    """One step of a plan with its frozen config and its cluster resources."""

    step: type[Step]
    config: Any
    resources: Resources = dataclasses.field(default_factory=Resources)


def _outputs(result: Batch | Iterator[Batch]) -> Iterator[Batch]:
    """A step returns one batch, or an iterator of batches when it expands rows (e.g. shard readers)."""
    if isinstance(result, dict):
        yield result
    else:
        yield from result


def _run_stateless(step: type[Step], config: Any, batch: Batch) -> Iterator[Batch]:
    """Task body: build the cheap (model-free) step and run it on one batch."""
    yield from _outputs(step(config)(with_reject_columns(batch)))


class _RunStateful:
    """Actor wrapper: the step (and its model) is built once per actor."""

    def __init__(self, step: type[Step], config: Any) -> None:
        self.impl = step(config)

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        yield from _outputs(self.impl(with_reject_columns(batch)))


def map_step(ds: ray.data.Dataset, planned: PlannedStep) -> ray.data.Dataset:
    """Apply one step to a Ray Dataset with explicit resources."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    res = planned.resources
    common: dict[str, Any] = {
        "batch_size": res.batch_size,
        "batch_format": "numpy",
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "zero_copy_batch": False,
    }
    if planned.step.stateful:
        actor = type(f"{planned.step.__name__}Actor", (_RunStateful,), {})  # named for Ray's progress/stats
        return ds.map_batches(
            actor,
            compute=ActorPoolStrategy(size=res.concurrency),
            fn_constructor_kwargs={"step": planned.step, "config": planned.config},
            **common,
        )
    step, config = planned.step, planned.config

    def task(batch: Batch) -> Iterator[Batch]:
        yield from _run_stateless(step, config, batch)

    task.__name__ = task.__qualname__ = step.__name__  # named for Ray's progress bars and stats
    # An explicit retry policy for CPU tasks. It also differs from the actors' remote args, so Ray Data does not
    # fuse a CPU step (decode, crop) into the next model actor: decoding keeps overlapping the model work.
    common["max_retries"] = TASK_MAX_RETRIES
    return ds.map_batches(task, compute=TaskPoolStrategy(size=res.concurrency), **common)


@dataclass(frozen=True)
class Plan:
    """Steps applied in order to a source with known columns."""

    source_columns: tuple[str, ...]
    steps: Sequence[PlannedStep]

    def check(self) -> tuple[str, ...]:
        """Validate configs and the column flow; returns the output columns.

        Raises:
            PlanError: naming the step and what is missing or wrong.
        """
        columns = list(dict.fromkeys((*self.source_columns, *REJECT_COLUMNS)))
        for i, planned in enumerate(self.steps):
            where = f"step {i} ({planned.step.name})"
            if not (dataclasses.is_dataclass(planned.config) and planned.config.__dataclass_params__.frozen):
                raise PlanError(
                    f"{where}: config must be a frozen dataclass, got {type(planned.config).__name__}"
                )
            if not isinstance(planned.resources, Resources):
                raise PlanError(
                    f"{where}: resources must be a Resources, got {type(planned.resources).__name__}"
                )
            missing = [c for c in planned.step.required_columns(planned.config) if c not in columns]
            if missing:
                raise PlanError(f"{where} requires columns {missing}, but only {columns} are available")
            columns.extend(c for c in planned.step.produces if c not in columns)
        return tuple(columns)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """Check, then chain every step onto ``ds`` (lazy: nothing runs until the dataset is consumed)."""
        self.check()
        for planned in self.steps:
            ds = map_step(ds, planned)
        return ds

    def run_local(self, batch: Batch) -> Batch:
        """Run the plan on one in-memory batch without Ray (tests, debugging)."""
        self.check()
        batches = [with_reject_columns(dict(batch))]
        for planned in self.steps:
            step = planned.step(planned.config)
            batches = [out for b in batches for out in _outputs(step(b))]
        return concat_batches(batches)
