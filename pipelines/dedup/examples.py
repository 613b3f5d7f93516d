"""The dedup report page: counts per kind, the nearest-neighbour similarity histogram (to pick epsilon by eye),
and a seeded sample of groups, each kept image beside its removed copies with their similarities.

Finding the sample costs one Ray Data pass over the dedup tables' small columns (the rows of the groups whose
kept key has the smallest seeded hashes: usually one pass, more only when groups are few and large) and one
read of each shard that holds a sampled image: never a scan on the driver. Thumbnails are inlined, so ``dedup_report.html`` is one self-contained
file.
"""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np

from pipelines.core.html import CSS, bars_svg
from pipelines.core.lookup import find_samples, jpeg_data_uri, thumbnail
from pipelines.dedup.steps import HIST_LOW, collect, partition_of
from schemas.columns import DEDUP_KIND, DEDUP_SIMILARITY, DUPLICATE_OF, KEY, SOURCE

THUMB_PX = 160
MAX_COPIES_SHOWN = 6


def _pick(batch: dict[str, np.ndarray], seed: int, ranks: int) -> dict[str, np.ndarray]:
    """The rows of groups whose kept key has a seeded hash rank below ``ranks``: removed rows by their
    ``duplicate_of``, kept rows by their own key (one pass finds both)."""
    group = np.asarray(
        [d if d is not None else k for k, d in zip(batch[KEY], batch[DUPLICATE_OF], strict=True)]
    )
    keep = partition_of([f"{seed}:{g}" for g in group], 1 << 20) < ranks
    return {c: v[keep] for c, v in batch.items()}


def sample_groups(root: str, options: dict[str, Any], n_groups: int, seed: int, n_removed: int) -> list[dict]:
    """Up to ``n_groups`` groups, chosen by a seeded hash of the kept key: ``{key, source, copies: [...]}``."""
    import ray

    if n_removed == 0:
        return []
    columns = [KEY, SOURCE, DUPLICATE_OF, DEDUP_KIND, DEDUP_SIMILARITY]
    tables = ray.data.read_parquet(f"{root}/parquet", columns=columns, filesystem=_fs(root, options))
    ranks = max(1, min(1 << 20, (1 << 20) * 4 * n_groups // n_removed))  # about 4 × n_groups removed rows
    while True:  # widen the hash range until enough groups (large groups make fewer of them)
        rows = collect(tables.map_batches(_pick, fn_args=(seed, ranks), batch_format="numpy"))
        dups = rows.get(DUPLICATE_OF, np.zeros(0, dtype=object))
        if ranks >= 1 << 20 or len({d for d in dups if d is not None}) >= n_groups:
            break
        ranks = min(1 << 20, ranks * 16)
    is_removed = np.asarray([d is not None for d in dups], dtype=bool)
    removed = {c: v[is_removed] for c, v in rows.items()}
    kept = {c: v[~is_removed] for c, v in rows.items()}
    kept_keys = sorted({str(d) for d in removed.get(DUPLICATE_OF, ())},
                       key=lambda k: (partition_of([f"{seed}:{k}"], 1 << 20)[0], k))[:n_groups]  # fmt: skip
    source = dict(zip(kept.get(KEY, ()), kept.get(SOURCE, ()), strict=True))
    groups = []
    for key in kept_keys:
        members = [i for i, d in enumerate(removed[DUPLICATE_OF]) if d == key]
        members.sort(key=lambda i: (-float(removed[DEDUP_SIMILARITY][i]), str(removed[KEY][i])))
        copies = [{"key": str(removed[KEY][i]), "source": str(removed[SOURCE][i]), "kind": str(removed[DEDUP_KIND][i]),
                   "similarity": float(removed[DEDUP_SIMILARITY][i])} for i in members[:MAX_COPIES_SHOWN]]  # fmt: skip
        groups.append(
            {"key": key, "source": str(source.get(key, "")), "copies": copies, "n_copies": len(members)}
        )
    return groups


def _fs(root: str, options: dict[str, Any]) -> Any:
    import fsspec

    return fsspec.core.url_to_fs(root, **options)[0]


def thumbnails(groups: list[dict], options: dict[str, Any]) -> dict[str, str]:
    """key → inline JPEG thumbnail (data URI) of every image in ``groups``, at most one read per source shard."""
    rows = [row for group in groups for row in (group, *group["copies"])]
    found = find_samples(((r["source"], r["key"]) for r in rows), options.get("endpoint_url"))
    thumbs = {key: thumbnail(sample["image"], THUMB_PX) for key, sample in found.items()}
    return {key: jpeg_data_uri(image) for key, image in thumbs.items() if image is not None}


def _figure(key: str, caption: str, thumbs: dict[str, str]) -> str:
    image = (f'<img src="{thumbs[key]}" alt="{escape(key)}">' if key in thumbs
             else '<div class="missing">image not found</div>')  # fmt: skip
    return f"<figure>{image}<figcaption><b>{escape(key)}</b><br>{caption}</figcaption></figure>"


def render_dedup_html(report: dict[str, Any], groups: list[dict], thumbs: dict[str, str]) -> str:
    """The whole page for a ``dedup_report.json`` dict and the sampled groups."""
    totals, settings = report["totals"], report["settings"]
    warn = ('<div class="warn"><b>Random weights.</b> The embeddings come from a scorer with seeded random '
            "weights: semantic verdicts and similarities test the pipeline only.</div>"
            if report.get("random_weights") else "")  # fmt: skip
    cards = "".join(f'<div class="card">{escape(label)}<b>{totals.get(key, 0):,}</b></div>' for label, key in
                    (("input", "n_input"), ("kept", "n_kept"), ("exact", "n_exact"), ("perceptual", "n_perceptual"),
                     ("semantic", "n_semantic"), ("reference", "n_reference")))  # fmt: skip
    counts = report["nn_histogram"]["counts"]
    epsilon = settings["semantic"]["epsilon"]
    marker = (1 - epsilon - HIST_LOW) / (1 - HIST_LOW) * (len(counts) - 1) / len(counts) + 1 / len(counts)
    chart = (bars_svg(counts, f"< {HIST_LOW}", "1.0", f"nearest-neighbour cosine (n={sum(counts):,})", width=720,
                      height=220, marker=marker if settings["semantic"]["enabled"] else None)
             if sum(counts) else "<p>Semantic dedup was off: no similarities.</p>")  # fmt: skip
    rows = "".join(
        f'<div class="sample">{_figure(g["key"], "kept", thumbs)}'
        + "".join(_figure(c["key"], f"{escape(c['kind'])} · {c['similarity']:.3f}", thumbs) for c in g["copies"])
        + (f"<div class='meta'>+{g['n_copies'] - len(g['copies'])} more</div>" if g["n_copies"] > len(g["copies"]) else "")
        + "</div>"
        for g in groups
    )  # fmt: skip
    table = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in settings.items())
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Dedup report</title>"
        f"<style>{CSS}.sample{{flex-wrap:wrap}}.missing{{width:160px;height:100px;background:#eee}}</style>"
        "</head><body><h1>Dedup report</h1>"
        f"{warn}<div class='cards'>{cards}</div>"
        f"<h2>Nearest-neighbour similarity</h2><p>The cosine of each row to its nearest neighbour in its k-means "
        f"cluster; the dashed line is 1 − epsilon = {1 - epsilon:.3f}: rows right of it have a duplicate.</p>{chart}"
        f"<h2>Example groups ({len(groups)}, seeded)</h2><p>The kept image first, then its removed copies with "
        f"their kind and similarity.</p>{rows or '<p>No duplicates.</p>'}"
        f"<h2>Settings</h2><table>{table}</table></body></html>"
    )
