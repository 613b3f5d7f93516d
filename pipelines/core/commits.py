"""Exactly-once output for every job: stage per input shard, commit per shard, manifest last.

An output directory holds:

- ``_staging/<shard>/<path>``: a shard's files while they are made (any task writes them), plus its
  rejects parts under ``_staging/<shard>/_rejects/`` and, once its commit has begun, ``_commit.json``;
- ``<path>``: committed files, moved out of staging under the same relative path;
- ``rejects/<shard>.parquet``: a committed shard's rejects, merged and sorted by key;
- ``_commits/<shard>.json``: the commit record (the shard's files and counts), written in one PUT: the commit
  point;
- ``_commits/_fingerprint.json``: what made the output (weights, preprocessing, rules ...), checked by every
  rerun (inside ``_commits/``: img2dataset reads every ``*.json`` at the top of its output as a shard's stats);
- the job's manifest (``manifest.json``), written last, with every shard's record and the totals.

``commit_shard`` runs in a Ray task per shard and is idempotent: it writes the intent (``_commit.json``),
merges the rejects, moves whatever is still staged, writes the record and removes the staging folder. A
crash at any point is finished by ``recover`` (an intent exists: roll forward) or undone (no intent: the
staging folder and the shard's rejects file go, and the shard is redone). A rerun therefore skips committed
shards, redoes the others, and never sees a file twice, whatever batch sizes either run used.

Driver cost: ``recover`` lists ``_commits/`` and ``_staging/`` once (one request per 1000 names on S3) and
touches only the shards a crash left behind; records are read concurrently; commits run as tasks.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.storage import table_bytes, write_bytes

STAGING, COMMITS, REJECTS = "_staging", "_commits", "rejects"
INTENT, FINGERPRINT = "_commit.json", f"{COMMITS}/_fingerprint.json"
OLD_FINGERPRINT = "_fingerprint.json"  # where outputs from before kept it
COMMIT_CPUS = 0.05  # commits are I/O: many may run beside the pipeline's tasks and actors
Record = dict[str, Any]


class CommitStore:
    """One job's output directory (local or any fsspec URL); picklable, so tasks get it as an argument."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **self.options)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommitStore, (self.root, self.options))

    def uri(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    # --- writing -------------------------------------------------------------------------------------------
    def stage(self, shard_id: str, relpath: str, data: bytes) -> None:
        """Write one whole file of ``shard_id``; it becomes ``<relpath>`` when the shard commits."""
        write_bytes(self.uri(f"{STAGING}/{shard_id}/{relpath}"), data, self.options)

    def stage_rejects(self, shard_id: str, part: str, table: pa.Table) -> None:
        """Stage one batch's rejects of ``shard_id`` (merged into ``rejects/<shard>.parquet`` at commit)."""
        self.stage(shard_id, f"_rejects/{part}.parquet", table_bytes(table))

    def commit(self, shard_id: str, record: Record) -> Record:
        """Make the shard's staged ``record["files"]`` visible and write its record (idempotent, see module)."""
        staging = f"{self.path}/{STAGING}/{shard_id}"
        intent = f"{staging}/{INTENT}"
        if not self.fs.exists(intent):
            write_bytes(self.fs.unstrip_protocol(intent), _json(record), self.options)
        self._merge_rejects(shard_id, staging)
        for relpath in (f["path"] for f in record.get("files", ())):
            source, target = f"{staging}/{relpath}", f"{self.path}/{relpath}"
            if self.fs.exists(source):
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(source, target)
            elif not self.fs.exists(target):
                raise FileNotFoundError(
                    f"{self.root}: shard {shard_id} commits {relpath}, which was never staged"
                )
        self.write_json(f"{COMMITS}/{shard_id}.json", record)
        self.fs.rm(staging, recursive=True)
        return record

    def _merge_rejects(self, shard_id: str, staging: str) -> None:
        folder = f"{staging}/_rejects"
        parts = sorted(self.fs.find(folder)) if self.fs.exists(folder) else []
        if parts:
            tables = [pq.read_table(self.fs.open(p, "rb")) for p in parts]
            merged = pa.concat_tables(tables)
            merged = merged.take(pc.sort_indices(merged, sort_keys=[("key", "ascending")]))
            write_bytes(self.uri(f"{REJECTS}/{shard_id}.parquet"), table_bytes(merged), self.options)

    def write_table(self, relpath: str, table: pa.Table) -> None:
        write_bytes(self.uri(relpath), table_bytes(table), self.options)

    def write_json(self, relpath: str, value: Any) -> None:
        write_bytes(self.uri(relpath), _json(value), self.options)

    def read_json(self, relpath: str) -> Any:
        path = f"{self.path}/{relpath}"
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])  # written by tasks elsewhere: ask the store itself
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def remove_if_empty(self, relpath: str) -> None:
        """Remove an empty folder (local file systems keep them; object stores have none)."""
        try:
            if not self.fs.ls(f"{self.path}/{relpath}", detail=False):
                self.fs.rmdir(f"{self.path}/{relpath}")
        except (FileNotFoundError, OSError):
            pass

    def remove(self, relpath: str) -> None:
        if self.fs.exists(f"{self.path}/{relpath}"):
            self.fs.rm(f"{self.path}/{relpath}", recursive=True)

    # --- reading the state ---------------------------------------------------------------------------------
    def _names(self, folder: str) -> list[str]:
        path = f"{self.path}/{folder}"
        self.fs.invalidate_cache(path)
        names = (
            [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
            if self.fs.exists(path)
            else []
        )
        self.fs.invalidate_cache(path)  # tasks in other processes write here: keep no listing of it
        return names

    def committed_ids(self) -> set[str]:
        """The committed shards (one listing of ``_commits/``)."""
        return {
            n[: -len(".json")] for n in self._names(COMMITS) if n.endswith(".json") and not n.startswith("_")
        }

    def records(self, shard_ids: Iterable[str], max_workers: int = 32) -> dict[str, Record]:
        """The commit records of ``shard_ids``, read concurrently."""
        ids = sorted(shard_ids)
        paths = [f"{self.path}/{COMMITS}/{s}.json" for s in ids]
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(paths)))) as pool:
            texts = list(pool.map(self.fs.cat_file, paths))
        return {s: json.loads(t) for s, t in zip(ids, texts, strict=True)}

    def recover(self, max_workers: int = 16) -> set[str]:
        """Finish or undo what a crashed run left in staging; returns the committed shard ids."""
        committed = self.committed_ids()
        staged = set(self._names(STAGING))

        def settle(shard_id: str) -> None:
            staging = f"{self.path}/{STAGING}/{shard_id}"
            if shard_id not in committed and self.fs.exists(f"{staging}/{INTENT}"):
                self.commit(shard_id, json.loads(self.fs.cat_file(f"{staging}/{INTENT}")))  # roll forward
                return
            if shard_id not in committed:
                self.remove(f"{REJECTS}/{shard_id}.parquet")
            self.fs.rm(staging, recursive=True)

        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(staged)))) as pool:
            list(pool.map(settle, sorted(staged)))
        return committed | {s for s in staged if self.fs.exists(f"{self.path}/{COMMITS}/{s}.json")}

    # --- fingerprint and manifest --------------------------------------------------------------------------
    def prepare(self, fingerprint: dict[str, Any], on_stale: str, redo: str = "redo") -> None:
        """Refuse (or, with ``on_stale`` = ``redo``, wipe) an output made with another fingerprint; record ours.

        ``redo`` is the job's word for replacing the output (encode says ``reencode``).
        """
        if on_stale not in ("refuse", redo):
            raise ValueError(f"on_stale={on_stale!r}; allowed: refuse, {redo}")
        old = self.read_json(FINGERPRINT) or self.read_json(OLD_FINGERPRINT)
        if old is not None and _normal(old) != _normal(fingerprint):
            if on_stale == "refuse":
                changed = sorted(k for k in {*old, *fingerprint} if old.get(k) != fingerprint.get(k))
                raise ValueError(
                    f"{self.root} holds output made with other settings ({', '.join(changed)} differ: "
                    f"{ {k: old.get(k) for k in changed} } there, { {k: fingerprint.get(k) for k in changed} } "
                    f"now); set on_stale={redo} to replace it, or choose another output_dir"
                )
            self.wipe()
        if old is None or _normal(old) != _normal(fingerprint):
            self.write_json(FINGERPRINT, fingerprint)

    def wipe(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)


class Endpoints:
    """For a job config with ``output_dir``, ``endpoint_url`` (of its inputs) and ``output_endpoint_url``
    (default: the inputs'): the inputs' storage options and the output's ``CommitStore``."""

    endpoint_url: str | None
    output_endpoint_url: str | None
    output_dir: str

    @property
    def input_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}

    @property
    def store(self) -> CommitStore:
        endpoint = self.output_endpoint_url or self.endpoint_url
        return CommitStore(self.output_dir, {"endpoint_url": endpoint} if endpoint else {})


class JobOutput:
    """One run of a per-shard job over ``store``: what is left to do, then the manifest, written last.

    ``start`` checks the fingerprint, recovers from a crashed run, and returns the shards still to do; the
    records of shards committed before come from the old manifest (one read) or, for shards committed since,
    from their records (read concurrently). ``finish`` writes the manifest over the current input shards.
    """

    def __init__(self, store: CommitStore, fingerprint: dict[str, Any], on_stale: str,
                 manifest: str = "manifest.json", redo: str = "redo") -> None:  # fmt: skip
        self.store, self.fingerprint, self.on_stale, self.manifest = store, fingerprint, on_stale, manifest
        self.redo = redo
        self.records: dict[str, Record] = {}

    def start(self, shard_ids: Iterable[str]) -> list[str]:
        self.store.prepare(self.fingerprint, self.on_stale, self.redo)
        old = self.store.read_json(self.manifest) or {}
        committed = self.store.recover()
        self.records = {s: r for s, r in old.get("shards", {}).items() if s in committed}
        self.records |= self.store.records(committed - set(self.records))
        todo = [s for s in shard_ids if s not in committed]
        if todo and old:
            self.store.remove(self.manifest)  # the folder is incomplete until the new manifest
        return todo

    def finish(self, new: dict[str, Record], shard_ids: Iterable[str], **fields: Any) -> dict[str, Any]:
        """Write the manifest: ``fields``, the fingerprint, totals and each current shard's record."""
        self.records |= new
        ids = list(shard_ids)
        missing = sorted(set(ids) - set(self.records))
        if missing:
            raise RuntimeError(
                f"shards {missing[:10]} of {self.store.root} were not committed; rerun to redo them"
            )
        shards = {s: self.records[s] for s in sorted(ids)}
        manifest = {**fields, "fingerprint": self.fingerprint, "totals": totals(shards.values()),
                    "n_shards": len(shards), "shards": shards}  # fmt: skip
        self.store.write_json(self.manifest, manifest)
        self.store.remove_if_empty(STAGING)
        return manifest


def totals(records: Iterable[Record]) -> dict[str, int]:
    """Sums of the records' counts (``n_*``, ``reason:*``, ``bucket:*`` ...: every integer field)."""
    out: Counter = Counter()
    for record in records:
        out.update({k: v for k, v in record.items() if isinstance(v, int) and not isinstance(v, bool)})
    return dict(sorted(out.items()))


def commit_shard(
    store: CommitStore, shard_id: str, record: Record, finalize: Callable[..., Record] | None = None
) -> Record:
    """Task body: optionally ``finalize`` the staged parts (e.g. merge them into one file), then commit."""
    if finalize is not None:
        record = finalize(store, shard_id, record)
    return store.commit(shard_id, record)


class Committer:
    """Commits shards as Ray tasks while a job streams; ``wait`` returns every record committed this run."""

    def __init__(self, store: CommitStore, finalize: Callable[..., Record] | None = None) -> None:
        import ray

        self.store, self.finalize = store, finalize
        self.task = ray.remote(num_cpus=COMMIT_CPUS, max_retries=3)(commit_shard)
        self.pending: dict[str, Any] = {}

    def submit(self, shard_id: str, record: Record) -> None:
        self.pending[shard_id] = self.task.remote(self.store, shard_id, record, self.finalize)

    def wait(self) -> dict[str, Record]:
        import ray

        ids = list(self.pending)
        return dict(zip(ids, ray.get([self.pending[s] for s in ids]), strict=True))


def read_manifest(
    root: str, storage_options: dict[str, Any] | None = None, name: str = "manifest.json"
) -> Any:
    """A job's manifest (None when the folder has none)."""
    return CommitStore(root, storage_options).read_json(name)


def _json(value: Any) -> bytes:
    """Compact JSON: a manifest lists every shard's files (tens of bytes each, millions at web scale)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str).encode()


def _normal(value: Any) -> Any:
    """JSON round trip: tuples and lists compare equal, as they will after a rerun reads them back."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
