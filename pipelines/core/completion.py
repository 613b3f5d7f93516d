"""When is an input shard complete in a streaming job? Its reader says how many rows it made.

A read step ends every shard with one *end marker*: a row whose reject reason is ``END_OF_SHARD`` and whose
detail is the number of rows the reader yielded for that shard. Later steps skip it like any rejected row;
writers never write it, they report it. The driver's ``ShardTracker`` adds up what the writers report and
tells when a shard is complete: its marker has arrived and each of its rows was written, healthy or rejected.
No count is read from storage, so knowing that a shard is complete costs the driver no I/O at all.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core.progress import Progress
from pipelines.core.step import Batch, batch_size, object_column
from schemas.columns import KEY, REJECT_DETAIL, REJECT_REASON, REJECT_STEP, SOURCE

if TYPE_CHECKING:
    from pipelines.core.commits import Committer
    from pipelines.core.plan import Plan

END_OF_SHARD = "end of shard"
SHARD_ID = "shard_id"
SUMMARY_COLUMNS = (SHARD_ID, "n_rows", "shard_rows", "parts", "counts")


def end_marker(
    columns: Iterable[str], shard_id: str, source: str, n_rows: int, empty: dict[str, Any] | None = None
) -> Batch:
    """The one-row batch that closes a shard: ``columns`` as the reader's batches, values None or, for tensor
    columns, their ``empty`` placeholder (Ray Data then sees one type per column across blocks)."""
    row: dict[str, Any] = dict.fromkeys(columns) | (empty or {})
    row |= {KEY: "", SOURCE: source, SHARD_ID: shard_id, REJECT_STEP: "read", REJECT_REASON: END_OF_SHARD,
            REJECT_DETAIL: str(n_rows)}  # fmt: skip
    return {name: object_column([value]) for name, value in row.items()}


def closed(
    batches: Iterable[Batch],
    columns: Sequence[str],
    shard_id: str,
    source: str,
    empty: dict[str, Any] | None = None,
) -> Iterator[Batch]:
    """A shard's non-empty batches, each row tagged with ``SHARD_ID``, then the shard's end marker."""
    n_rows = 0
    for batch in batches:
        n = batch_size(batch)
        if n:
            batch[SHARD_ID] = object_column([shard_id] * n)
            n_rows += n
            yield batch
    yield end_marker(columns, shard_id, source, n_rows, empty)


def is_marker(batch: Batch) -> np.ndarray:
    """Boolean mask of the end markers in a batch."""
    return np.asarray([r == END_OF_SHARD for r in batch[REJECT_REASON]], dtype=bool)


class ShardSummary:
    """What one writer batch did per shard: rows written, staged parts, counts, and any shard's row total."""

    def __init__(self, batch: Batch) -> None:
        self.shards: dict[str, dict[str, Any]] = {}
        marker = is_marker(batch)
        for i, shard_id in enumerate(batch[SHARD_ID]):
            entry = self.entry(str(shard_id))
            if marker[i]:
                entry["shard_rows"] = int(batch[REJECT_DETAIL][i])
            else:
                entry["n_rows"] += 1

    def entry(self, shard_id: str) -> dict[str, Any]:
        return self.shards.setdefault(
            shard_id, {"n_rows": 0, "shard_rows": -1, "parts": [], "counts": Counter()}
        )

    def add_part(self, shard_id: str, part: dict[str, Any]) -> None:
        self.entry(shard_id)["parts"].append(part)

    def count(self, shard_id: str, **counts: int) -> None:
        self.entry(shard_id)["counts"].update(counts)

    def batch(self) -> Batch:
        """One summary row per shard (``SUMMARY_COLUMNS``), the writer step's output."""
        ids = sorted(self.shards)
        rows = [self.shards[s] for s in ids]
        return {
            SHARD_ID: object_column(ids),
            "n_rows": np.asarray([r["n_rows"] for r in rows], dtype=np.int64),
            "shard_rows": np.asarray([r["shard_rows"] for r in rows], dtype=np.int64),
            "parts": object_column(json.dumps(r["parts"]) for r in rows),
            "counts": object_column(json.dumps(dict(r["counts"])) for r in rows),
        }


class ShardTracker:
    """Adds up writer summaries on the driver; ``add`` returns the records of shards that just completed."""

    def __init__(self) -> None:
        self.rows: Counter = Counter()
        self.totals: dict[str, int] = {}
        self.parts: dict[str, list] = defaultdict(list)
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.done: set[str] = set()
        self.n_rejected = 0  # over all shards, for the progress line

    def add(self, summary: Batch) -> list[dict[str, Any]]:
        complete = []
        for shard_id, n_rows, total, parts, counts in zip(
            *(summary[c] for c in SUMMARY_COLUMNS), strict=True
        ):
            shard_id = str(shard_id)
            if shard_id in self.done:
                raise RuntimeError(f"shard {shard_id}: rows arrived after the shard was complete")
            self.rows[shard_id] += int(n_rows)
            if int(total) >= 0:
                self.totals[shard_id] = int(total)
            self.parts[shard_id] += json.loads(parts)
            counts = json.loads(counts)
            self.counts[shard_id].update(counts)
            self.n_rejected += int(counts.get("n_rejected", 0))
            if self.totals.get(shard_id) == self.rows[shard_id]:
                self.done.add(shard_id)
                complete.append({"shard_id": shard_id, "parts": self.parts.pop(shard_id),
                                 **dict(self.counts.pop(shard_id))})  # fmt: skip
        return complete

    def pending(self) -> list[str]:
        """Shards that reported rows but are not complete."""
        return sorted(set(self.rows) - self.done)


def run_and_commit(
    plan: Plan,
    items: list[dict[str, Any]],
    committer: Committer,
    record: Callable[[dict], dict] | None = None,
    job: str = "job",
) -> dict[str, dict[str, Any]]:
    """Stream ``items`` (one row per input shard) through ``plan``, whose last step is a writer, and commit each
    shard as soon as it is complete (``record`` turns the tracker's record into the commit record); returns the
    records committed in this run. Progress (shards, samples, rejects) is shown under the label ``job``."""
    import ray

    if items:
        tracker = ShardTracker()
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        with Progress(job, len(items)) as progress:
            # batch_size=None: every block as soon as it exists, so shards commit while the job runs
            for batch in plan.apply(ds).iter_batches(
                batch_size=None, batch_format="numpy", prefetch_batches=0
            ):
                rejected = tracker.n_rejected
                complete = tracker.add(batch)
                for done in complete:
                    committer.submit(done["shard_id"], record(done) if record else done)
                progress.update(len(complete), samples=int(np.sum(batch["n_rows"])),
                                rejects=tracker.n_rejected - rejected)  # fmt: skip
    return committer.wait()


def collect_records(
    plan: Plan,
    items: list[dict[str, Any]],
    job: str,
    samples: str = "n_input",
    rejects: str | None = "n_rejected",
) -> dict[str, dict[str, Any]]:
    """Run ``plan`` (one task per item, each returning a shard's JSON ``record``) over ``items`` and collect the
    records by shard id, showing progress: shards done, and the records' ``samples`` and ``rejects`` counts."""
    import ray

    records: dict[str, dict[str, Any]] = {}
    if not items:
        return records
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with Progress(job, len(items)) as progress:
        for batch in plan.apply(ds).iter_batches(batch_size=None, batch_format="numpy"):
            done = {str(s): json.loads(r) for s, r in zip(batch[SHARD_ID], batch["record"], strict=True)}
            records |= done
            counts = {"samples": samples} | ({"rejects": rejects} if rejects else {})
            progress.update(len(done), **{name: sum(int(r.get(key, 0)) for r in done.values())
                                          for name, key in counts.items()})  # fmt: skip
    return records
