"""Score image–text shards: one CLIP ViT-L/14 image pass gives the image embedding, the LAION aesthetic
score and the CLIP image–text similarity; cheap scores (size, aspect, caption length) and the sample JSON's
watermark/nsfw probabilities come along. Scores are stored per key in Parquet, with the unnormalised
CLIP-L ``image_embeds`` that the encode step reuses as Stage C's ``clip_img``.

Pipeline: shard rows → ``ReadShard`` (tasks) → ``ScoreSamples`` (actor pool, model loaded once per actor)
→ ``StageRows`` (tasks). Undecodable images become rejects with their reason. Output: one
``parquet/<shard>.parquet`` per input shard (sorted by key), ``rejects/<shard>.parquet``, the commit records and
``manifest.json`` last (``pipelines.core.commits``): a rerun, with any batch sizes, gives the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.by_shard import LAYOUT, MergeParts
from pipelines.core.commits import Committer, JobOutput
from pipelines.core.completion import SHARD_ID, closed, run_and_commit
from pipelines.core.images import PILLOW_MAX_PIXELS, ImageError, decode_rgb, perceptual_hash, to_float_chw
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.sink import StageConfig, StageRows
from pipelines.core.sources import (
    READ_COLUMNS,
    SourceConfig,
    caption_text,
    read_shard,
    shard_id,
    unique_shards,
)
from pipelines.core.step import Batch, Resources, Step, healthy, reject
from pipelines.core.validate import drop_repeated_keys
from schemas import FileMetadata, preprocessing_hash, scores_schema
from schemas.columns import (
    AESTHETIC_SCORE,
    ASPECT_RATIO,
    CAPTION,
    CAPTION_LENGTH,
    CLIP_IMAGE_EMBEDS,
    CLIP_SIMILARITY,
    HEIGHT,
    IMAGE,
    IMAGE_SHA256,
    KEY,
    META_JSON,
    NSFW_PROBABILITY,
    PHASH,
    SOURCE,
    WATERMARK_PROBABILITY,
    WIDTH,
)

SCORE_COLUMNS = (
    KEY, SOURCE, IMAGE_SHA256, PHASH, WIDTH, HEIGHT, ASPECT_RATIO, CAPTION_LENGTH, AESTHETIC_SCORE, CLIP_SIMILARITY,
    CLIP_IMAGE_EMBEDS, WATERMARK_PROBABILITY, NSFW_PROBABILITY,
)  # fmt: skip
# Names metadata fields go by in common datasets (LAION: pwatermark/punsafe; COYO: watermark_score, nsfw_score_*).
META_FIELDS = {
    WATERMARK_PROBABILITY: ("watermark_probability", "pwatermark", "watermark_score"),
    NSFW_PROBABILITY: ("nsfw_probability", "punsafe", "nsfw_score_opennsfw2", "nsfw_score"),
}


@dataclass(frozen=True, kw_only=True)
class ScorerConfig:
    """The scoring model: a flavor plus local weights (tiny flavors run on seeded random weights)."""

    flavor: str
    clip_weights: str | None = None
    aesthetic_weights: str | None = None
    device: str = "cpu"
    max_pixels: int = PILLOW_MAX_PIXELS

    @property
    def random_weights(self) -> bool:
        """Tiny scorer flavors run on seeded random weights (released ones refuse to run without theirs)."""
        return self.flavor.endswith("/tiny")

    def __post_init__(self) -> None:
        from stages.scorers import FLAVORS

        if self.flavor not in FLAVORS:
            raise ValueError(f"scorer.flavor={self.flavor!r}; known: {', '.join(FLAVORS)}")
        if not self.random_weights and (self.clip_weights is None or self.aesthetic_weights is None):
            raise ValueError(
                f"scorer.clip_weights and scorer.aesthetic_weights are required for {self.flavor} (random "
                "weights give meaningless scores); use clip_score/tiny for a dry run"
            )


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """A score job: ingested shards in, one scores Parquet file per shard out.

    Attributes:
        shards: the ingested image–text shards (``kind: webdataset``).
        output_dir: where ``parquet/<shard>.parquet``, ``rejects/``, ``_commits/`` and ``manifest.json`` go.
        scorer: the CLIP model and the aesthetic head.
        on_stale: an output scored with another scorer or weights: ``refuse`` or ``redo``.
        *_resources: Ray resources per step (the scorer is an actor pool).
    """

    shards: SourceConfig
    output_dir: str
    scorer: ScorerConfig
    output_endpoint_url: str | None = None
    on_stale: str = "refuse"
    read_resources: Resources = dataclasses.field(
        default_factory=lambda: Resources(batch_size=1, concurrency=2)
    )
    score_resources: Resources = dataclasses.field(default_factory=lambda: Resources(batch_size=32))
    write_resources: Resources = dataclasses.field(default_factory=lambda: Resources(batch_size=4096))

    def __post_init__(self) -> None:
        if self.shards.kind != "webdataset":
            raise ValueError(f"shards.kind={self.shards.kind!r}: score reads ingested WebDataset shards")


class ReadShard(Step):
    """Expand shard rows into sample rows (one output batch per ``batch_rows`` samples), each shard closed by
    its end marker; a key repeated within a shard is a reject ("duplicate key"), the first one wins."""

    name = "read"
    requires = ("shard_index", "uris")
    produces = (*READ_COLUMNS, SHARD_ID)

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        for shard_index, uris in zip(batch["shard_index"], batch["uris"], strict=True):
            shard = {"shard_index": int(shard_index), "uris": list(uris)}
            seen: set[str] = set()
            rows = (drop_repeated_keys(b, seen, step="score") for b in read_shard(self.config, shard))
            yield from closed(rows, self.produces, shard_id(shard["uris"][0]), shard["uris"][0])


def _meta_value(meta: dict[str, Any], names: tuple[str, ...]) -> float:
    for name in names:
        value = meta.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return float("nan")


class ScoreSamples(Step):
    """Decode each image once, score the batch with one CLIP pass, fill the score columns; the sha256 of the
    bytes and the pHash of that same decode are what ``cascade dedup`` groups by."""

    name = "score"
    requires = (KEY, CAPTION, IMAGE, META_JSON)
    produces = SCORE_COLUMNS[2:]
    stateful = True

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__(config)
        import torch

        from stages.scorers import FLAVORS, ClipScorer

        flavor = FLAVORS[config.flavor]
        if config.clip_weights is None:
            scorer = ClipScorer(flavor)
        else:
            scorer = ClipScorer.load(
                flavor, clip_weights=config.clip_weights, aesthetic_weights=config.aesthetic_weights
            )
        self.scorer = scorer.to(config.device)
        self.torch = torch

    def _outputs(self, n: int) -> Batch:
        dim = self.scorer.config.embed_dim
        out: Batch = {c: np.full(n, np.nan, dtype=np.float32) for c in
                      (ASPECT_RATIO, AESTHETIC_SCORE, CLIP_SIMILARITY, WATERMARK_PROBABILITY, NSFW_PROBABILITY)}  # fmt: skip
        out |= {
            WIDTH: np.zeros(n, np.int32),
            HEIGHT: np.zeros(n, np.int32),
            CAPTION_LENGTH: np.zeros(n, np.int32),
        }
        out[CLIP_IMAGE_EMBEDS] = np.zeros((n, dim), dtype=np.float32)
        out[IMAGE_SHA256] = np.full(n, "", dtype=object)
        out[PHASH] = np.zeros(n, np.uint64)
        return out

    def __call__(self, batch: Batch) -> Batch:
        out = self._outputs(len(batch[KEY]))
        batch[CAPTION] = np.asarray([caption_text(c) for c in batch[CAPTION]], dtype=object)  # text once
        rows, images = [], []
        for i in healthy(batch):
            data = bytes(batch[IMAGE][i])
            try:
                rgb = decode_rgb(data, max_pixels=self.config.max_pixels)
            except ImageError as exc:
                reject(batch, i, self.name, exc.reason, exc.detail)
                continue
            out[IMAGE_SHA256][i] = hashlib.sha256(data).hexdigest()
            out[PHASH][i] = perceptual_hash(rgb)
            rows.append(i)
            images.append(self.torch.from_numpy(to_float_chw(rgb)))
        if rows:
            result = self.scorer.score(images, [batch[CAPTION][i] for i in rows])
            out[CLIP_IMAGE_EMBEDS][rows] = result.image_embeds.cpu().numpy()
            out[AESTHETIC_SCORE][rows] = result.aesthetic.cpu().numpy()
            out[CLIP_SIMILARITY][rows] = result.clip_similarity.cpu().numpy()
        for j, i in enumerate(rows):
            h, w = images[j].shape[-2:]
            out[WIDTH][i], out[HEIGHT][i], out[ASPECT_RATIO][i] = w, h, w / h
            out[CAPTION_LENGTH][i] = len(batch[CAPTION][i])
            try:
                meta = json.loads(batch[META_JSON][i] or "{}")
            except json.JSONDecodeError:
                meta = {}
            for column, names in META_FIELDS.items():
                out[column][i] = _meta_value(meta if isinstance(meta, dict) else {}, names)
        return batch | out


@dataclass(frozen=True)
class ScoreSummary:
    output_dir: str
    n_shards: int
    n_skipped_shards: int
    n_scored: int
    n_rejected: int
    reject_reasons: dict[str, int]


def _stage_config(config: ScoreConfig) -> StageConfig:
    from stages.scorers import FLAVORS

    flavor = FLAVORS[config.scorer.flavor]
    schema = scores_schema(flavor.embed_dim)
    meta = FileMetadata(
        schema_id=schema.id,
        encoder_flavors={"clip_score": config.scorer.flavor},
        preprocessing_hash=preprocessing_hash(flavor.vision.preprocess_spec()),
        tensor_shapes=schema.tensor_specs,
    )
    return StageConfig(output_dir=config.output_dir, metadata=meta, endpoint_url=config.output_endpoint_url)


def score_plan(config: ScoreConfig) -> Plan:
    """The checked plan of a score job (config errors surface here, before Ray)."""
    plan = Plan(
        ("shard_index", "uris"),
        [
            PlannedStep(ReadShard, config.shards, config.read_resources),
            PlannedStep(ScoreSamples, config.scorer, config.score_resources),
            PlannedStep(StageRows, _stage_config(config), config.write_resources),
        ],
    )
    plan.check()
    return plan


def fingerprint(config: ScoreConfig) -> dict[str, Any]:
    """What makes the stored scores: the scorer flavor, its weights and its preprocessing."""
    from stages.weights import sha256_of

    stage = _stage_config(config)
    return {"schema": stage.metadata.schema_id, "scorer": config.scorer.flavor,
            "preprocessing_hash": stage.metadata.preprocessing_hash,
            "weights_sha256": {name: sha256_of(path) for name, path in
                               (("clip", config.scorer.clip_weights), ("aesthetic", config.scorer.aesthetic_weights))
                               if path}}  # fmt: skip


def run_score(config: ScoreConfig) -> ScoreSummary:
    """Score every shard not yet committed in ``output_dir`` on the current Ray cluster."""
    plan = score_plan(config)
    shards = unique_shards(config.shards)
    stage = _stage_config(config)
    output = JobOutput(stage.store, fingerprint(config), config.on_stale)
    todo = set(output.start(shards))
    committer = Committer(stage.store, MergeParts(stage.file_schema))
    new = run_and_commit(plan, [s for i, s in shards.items() if i in todo], committer, job="score")
    manifest = output.finish(new, shards, schema=stage.metadata.schema_id, layout=LAYOUT,
                             shards_path=config.shards.path, random_weights=config.scorer.random_weights)  # fmt: skip
    totals = manifest["totals"]
    reasons = {k.removeprefix("reason:"): v for k, v in totals.items() if k.startswith("reason:")}
    return ScoreSummary(config.output_dir, len(shards), len(shards) - len(todo), totals.get("n_written", 0),
                        totals.get("n_rejected", 0), reasons)  # fmt: skip
