"""Exactly-once output for jobs that write per input shard: stage, then commit, with a commit log.

Parts of shard ``S`` are staged under ``_staging/S/``; ``commit(S)`` moves them into their final folders (names
start with ``S``) and then writes ``_commits/S.json`` in one PUT: that record is the commit point. A
resubmitted job skips shards with a record and clears everything else of the shard before redoing it, so a
crash at any moment leaves no duplicate behind.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.storage import write_bytes


class CommitStore:
    """The output directory: staging, commit records, final files and the manifest."""

    def __init__(self, root: str, storage_options: dict[str, Any]) -> None:
        self.root = root.rstrip("/")
        self.options = storage_options
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **storage_options)

    def read_json(self, name: str) -> dict | None:
        path = f"{self.path}/{name}"
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def write_json(self, name: str, value: Any) -> None:
        write_bytes(f"{self.root}/{name}", json.dumps(value, indent=2, default=str).encode(), self.options)

    def committed(self) -> dict[str, dict]:
        found = self.fs.glob(f"{self.path}/_commits/*.json")
        return {p.rsplit("/", 1)[-1][:-5]: json.loads(self.fs.cat_file(p)) for p in found}

    def clear_shard(self, shard_id: str) -> None:
        """Remove every trace of an uncommitted shard (staging and any half-moved final files)."""
        for pattern in (f"_staging/{shard_id}", f"parquet/{shard_id}-*", f"webdataset/{shard_id}-*",
                        f"rejects/{shard_id}.parquet"):  # fmt: skip
            for path in self.fs.glob(f"{self.path}/{pattern}"):
                self.fs.rm(path, recursive=True)

    def wipe(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def commit(self, shard_id: str, counts: Counter) -> dict:
        """Move a complete shard's staged parts into place, then write its commit record (the commit point)."""
        staged = sorted(self.fs.find(f"{self.path}/_staging/{shard_id}"))
        files = []
        for path in staged:
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".rejects.parquet"):
                continue
            folder = "parquet" if name.endswith(".parquet") else "webdataset"
            target = f"{self.path}/{folder}/{shard_id}-{name}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.mv(path, target)
            files.append(f"{folder}/{shard_id}-{name}")
        rejects = [p for p in staged if p.endswith(".rejects.parquet")]
        if rejects:
            tables = [pq.read_table(self.fs.open(p, "rb")) for p in rejects]
            sink = pa.BufferOutputStream()
            pq.write_table(pa.concat_tables(tables), sink)
            write_bytes(f"{self.root}/rejects/{shard_id}.parquet", sink.getvalue().to_pybytes(), self.options)
        record = {"shard_id": shard_id, "files": files, **counts}
        self.write_json(f"_commits/{shard_id}.json", record)
        if self.fs.exists(f"{self.path}/_staging/{shard_id}"):
            self.fs.rm(f"{self.path}/_staging/{shard_id}", recursive=True)
        return record
