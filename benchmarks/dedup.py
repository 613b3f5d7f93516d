"""``cascade dedup`` at 10^5 and 10^6 synthetic 768-d embeddings on this machine (2 cores): wall time, peak
memory, recall of the planted near-copies, and recall of ε-pairs against exact all-pairs search on a 2·10^4
subset (the ground truth).

Goals (issue 16): 10^6 in <= 10 minutes; peak memory <= 8 GiB; time(10^6)/time(10^5) <= 12; ε-pair recall >=
0.98. Memory is the proportional set size (PSS, shared object-store pages split among the processes mapping
them) summed over this process and every process it started (Ray's raylet, workers, object store), sampled
every 0.5 s.

    python benchmarks/dedup.py [--sizes 100000 1000000] [--out benchmarks/results/dedup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from dedup_data import write_scores  # benchmarks/dedup_data.py
from local_ray import local_ray  # benchmarks/local_ray.py

ROWS_PER_SHARD = 1000


def _children() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def tree_pss_bytes(root: int) -> int:
    """PSS of ``root`` and all its descendants."""
    parents = _children()
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, tree_pss_bytes(os.getpid()))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def final_keys(output: Path) -> dict[str, str]:
    rows = pq.read_table(output / "parquet", columns=["key", "duplicate_of"]).to_pylist()
    return {r["key"]: r["duplicate_of"] or r["key"] for r in rows}


def run_job(scores: Path, output: Path) -> tuple[float, dict]:
    from pipelines.dedup.pipeline import DedupConfig, run_dedup

    start = time.perf_counter()
    summary = run_dedup(DedupConfig(scores_dir=str(scores), output_dir=str(output)))
    return time.perf_counter() - start, summary.__dict__


def one_size(work: Path, n: int) -> dict:
    scores, output = work / f"scores_{n}", work / f"dedup_{n}"
    start = time.perf_counter()
    pairs = write_scores(scores, n, max(1, n // ROWS_PER_SHARD), seed=0)
    written = time.perf_counter() - start
    with local_ray(), PeakMemory() as memory:
        seconds, summary = run_job(scores, output)
    final = final_keys(output)
    recall = float(np.mean([final[a] == final[b] for a, b in pairs]))
    shutil.rmtree(scores)
    shutil.rmtree(output)
    return {"rows": n, "shards": max(1, n // ROWS_PER_SHARD), "seconds": round(seconds, 1),
            "peak_pss_gib": round(memory.peak / 2**30, 2), "planted_pairs": len(pairs),
            "planted_pair_recall": recall, "summary": summary, "write_input_seconds": round(written, 1)}  # fmt: skip


def ground_truth(work: Path, n: int = 20_000) -> dict:
    """ε-pairs of the job against exact all-pairs search (epsilon 0.05) on ``n`` rows."""
    scores, output = work / "scores_truth", work / "dedup_truth"
    write_scores(scores, n, 20, seed=1)
    with local_ray():
        seconds, _ = run_job(scores, output)
    table = pq.read_table(scores / "parquet", columns=["key", "clip_image_embeds"])
    keys = table["key"].to_pylist()
    x = np.asarray(table["clip_image_embeds"].to_pylist(), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    final = final_keys(output)
    found = total = 0
    for start in range(0, n, 2000):  # all pairs, in blocks
        sims = x[start : start + 2000] @ x.T
        for i, j in np.argwhere(sims >= 0.95):
            i += start
            if i < j:
                total += 1
                found += final[keys[i]] == final[keys[j]]
    return {
        "rows": n,
        "eps_pairs": total,
        "eps_pair_recall": found / max(1, total),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", default="benchmarks/results/dedup.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dedup_bench") as tmp:
        work = Path(tmp)
        sizes = [one_size(work, n) for n in args.sizes]
        truth = ground_truth(work)
    result = {"sizes": sizes, "ground_truth": truth}
    if len(sizes) >= 2:
        result["time_ratio"] = round(sizes[-1]["seconds"] / sizes[0]["seconds"], 2)
        result["rows_ratio"] = sizes[-1]["rows"] / sizes[0]["rows"]
    result["goals"] = {"largest_under_10_min": sizes[-1]["seconds"] <= 600,
                       "peak_under_8_gib": all(s["peak_pss_gib"] <= 8 for s in sizes),
                       "near_linear": result.get("time_ratio", 0) <= 12 * result.get("rows_ratio", 10) / 10,
                       "eps_recall_at_least_0.98": truth["eps_pair_recall"] >= 0.98}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
