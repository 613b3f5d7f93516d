"""``cascade encode``: image–text shards → latent shards (Parquet and/or WebDataset), exactly once.

Pipeline (Ray Data, streaming with backpressure): shard rows → ``EncodeRead`` (tasks) →
``PreprocessImages`` (CPU tasks: decode, crop, bucket) → one actor pool per model (effnet, optional
Stage A, CLIP-bigG text, CLIP-L image) → ``WriteLatentParts`` (tasks). CPU decoding overlaps model work.
With Stage A latents, the effnet actors also store Stage B's conditioning latents (``stage_b_conditioning``,
``pipelines.encode.stage_b``).

The read task of a shard opens that shard's kept keys and stored CLIP-L embeddings by name
(``pipelines.core.by_shard``): no scan of the whole filter or score output.

Exactly once (``pipelines.core.commits``): the writer stages parts under ``_staging/<shard>/``; the driver adds
up what the writers report and, when a shard's end marker and all its rows have arrived, a Ray task commits
it: moves its parts into ``parquet/`` and ``webdataset/`` (names start with the input shard id) and writes
``_commits/<shard>.json`` with each part's rows and bucket. The manifest is written last. A resubmitted job
skips committed shards and redoes the others; readers only read committed files. An output whose encoder
fingerprint (flavors, weights sha256, preprocessing hash, dtype) differs from the config's is stale: refused,
or re-encoded from scratch (``on_stale``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.by_shard import open_per_shard
from pipelines.core.commits import CommitStore, Committer, JobOutput
from pipelines.core.commits import totals as _totals
from pipelines.core.completion import run_and_commit
from pipelines.core.latents_io import LAYOUT
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.sources import SourceConfig, unique_shards
from pipelines.core.step import Resources
from pipelines.core.storage import write_bytes
from pipelines.core.validate import ValidateConfig
from pipelines.encode import stage_b
from pipelines.encode.models import (
    EffnetStageBConfig,
    EncodeEffnet,
    EncodeEffnetStageB,
    EncodeImage,
    EncoderConfig,
    EncodeStageA,
    EncodeText,
    encode_captions,
)
from pipelines.encode.steps import EncodeRead, PreprocessImages, PreprocessStepConfig, ReadConfig
from pipelines.encode.writer import WriteConfig, WriteLatentParts, fingerprint_metadata
from schemas import SCORES_IDS

ON_STALE = ("refuse", "reencode", "redo")


def _actor(num_cpus: float = 0.25) -> Resources:
    return Resources(num_cpus=num_cpus, concurrency=1, batch_size=32)


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """An encode job.

    Attributes:
        shards: the image–text shards (``kind: webdataset``) from ingest or img2dataset.
        output_dir: where ``parquet/``, ``webdataset/``, ``_commits/`` and ``manifest.json`` go.
        kept_keys: ``cascade filter``'s output folder (None: encode every sample); an older single
            ``kept_keys.parquet`` is partitioned by shard once, into ``output_dir/_inputs/kept_keys``.
        scores_dir: scores from ``cascade score``; their CLIP-L embeddings are reused instead of recomputed
            (an older scores folder is partitioned once, into ``output_dir/_inputs/scores``).
        inputs_endpoint_url: S3 endpoint of ``kept_keys`` and ``scores_dir`` (default: the shards').
        preprocess: crop mode (``center`` or ``buckets``), image size (768), Stage A size (1024).
        validate: the ingest's sample checks, applied again (bad rows from upstream become rejects).
        effnet, clip_text, clip_image, stage_a: the encoders (``stage_a`` None: no Stage A latents). Required:
            released flavors need their weights; ``*/tiny`` flavors are seeded random weights for tests.
        stage_b_conditioning: Stage B training's effnet conditioning, stored next to the Stage A latents:
            ``exact`` (default with Stage A: the effnet latent of the Stage A crop resized with NEAREST to
            every size official training draws, ⌊n/2⌋…n−1 cells for an n-cell crop, 16…31 at 1024 px),
            ``subset`` (only ``stage_b_cells``; training takes the nearest stored size) or ``none``. Without
            Stage A it must be ``none`` or unset. Columns ``stage_b_effnet_{s}``, by the effnet encoder.
        stage_b_cells: the sizes (latent cells) ``subset`` stores, ascending, each in [⌊n/2⌋, n−1];
            default (n/2, 3n/4, n−1), i.e. (16, 24, 31) at 1024 px.
        dtype: stored tensor dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        formats: any of ``parquet`` and ``webdataset``; both are written from the same table.
        member_format: WebDataset tensor members: ``npy`` or ``safetensors``.
        on_stale: an existing output encoded with other weights/preprocessing: ``refuse`` or ``reencode``
            (``redo`` is the same).
        *_resources: Ray resources per step (model steps are actor pools; set ``num_gpus`` on GPU nodes).
    """

    shards: SourceConfig
    output_dir: str
    kept_keys: str | None = None
    scores_dir: str | None = None
    inputs_endpoint_url: str | None = None
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    effnet: EncoderConfig
    clip_text: EncoderConfig
    clip_image: EncoderConfig
    stage_a: EncoderConfig | None = None
    stage_b_conditioning: str | None = None
    stage_b_cells: tuple[int, ...] | None = None
    dtype: str = "float16"
    formats: tuple[str, ...] = ("parquet", "webdataset")
    member_format: str = "npy"
    on_stale: str = "refuse"
    output_endpoint_url: str | None = None
    read_resources: Resources = dataclasses.field(
        default_factory=lambda: Resources(num_cpus=0.25, batch_size=1)
    )
    preprocess_resources: Resources = dataclasses.field(
        default_factory=lambda: Resources(num_cpus=0.5, batch_size=8)
    )
    effnet_resources: Resources = dataclasses.field(default_factory=_actor)
    stage_a_resources: Resources = dataclasses.field(default_factory=_actor)
    clip_text_resources: Resources = dataclasses.field(default_factory=_actor)
    clip_image_resources: Resources = dataclasses.field(default_factory=_actor)
    write_resources: Resources = dataclasses.field(
        default_factory=lambda: Resources(num_cpus=0.25, batch_size=64)
    )

    def __post_init__(self) -> None:
        if self.shards.kind != "webdataset":
            raise ValueError(f"shards.kind={self.shards.kind!r}: encode reads WebDataset image–text shards")
        if self.on_stale not in ON_STALE:
            raise ValueError(f"on_stale={self.on_stale!r}; allowed: {', '.join(ON_STALE)}")
        if not self.formats or set(self.formats) - {"parquet", "webdataset"}:
            raise ValueError(f"formats={self.formats!r}: any of 'parquet', 'webdataset'")
        for role, family in (("effnet", "effnet"), ("clip_text", "clip_text"), ("clip_image", "clip_vision"),
                             ("stage_a", "stage_a")):  # fmt: skip
            encoder = getattr(self, role)
            if encoder is not None and not encoder.flavor.startswith(family):
                raise ValueError(f"{role}.flavor={encoder.flavor!r} is not a {family} flavor")
        if isinstance(self.stage_b_cells, list):  # from YAML
            object.__setattr__(self, "stage_b_cells", tuple(self.stage_b_cells))
        _ = self.stored_stage_b_cells  # a bad Stage B config: ValueError naming the field

    @property
    def stage_b_mode(self) -> str:
        """``stage_b_conditioning`` with its default filled in (``exact`` with Stage A, else ``none``)."""
        return stage_b.effective_mode(self.stage_b_conditioning, self.stage_a is not None)

    @property
    def stored_stage_b_cells(self) -> tuple[int, ...]:
        """The Stage B sizes (latent cells) this config stores: one ``stage_b_effnet_{s}`` column each."""
        return stage_b.resolve(self.stage_b_conditioning, self.stage_b_cells, self.stage_a is not None,
                               self.preprocess.stage_a_size_px)  # fmt: skip

    def stage_b_metadata(self) -> dict[str, Any]:
        """``cascade.stage_b_conditioning`` of the files ({} without Stage B columns)."""
        cells = self.stored_stage_b_cells
        if not cells:
            return {}
        from stages.flavors import get_flavor

        channels = get_flavor(self.effnet.flavor).config.c_latent
        return stage_b.conditioning_metadata(self.stage_b_mode, cells, self.preprocess.stage_a_size_px,
                                             channels, self.dtype)  # fmt: skip

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.output_endpoint_url} if self.output_endpoint_url else {}

    @property
    def inputs_options(self) -> dict[str, Any]:
        endpoint = self.inputs_endpoint_url or self.shards.endpoint_url
        return {"endpoint_url": endpoint} if endpoint else {}

    def encoders(self) -> dict[str, EncoderConfig]:
        roles = {"effnet": self.effnet, "clip_text": self.clip_text, "clip_image": self.clip_image}
        return roles | ({"stage_a": self.stage_a} if self.stage_a is not None else {})


@dataclass(frozen=True)
class EncodeSummary:
    output_dir: str
    n_shards: int
    n_skipped_shards: int
    n_encoded: int
    n_rejected: int
    reject_reasons: dict[str, int]
    buckets: dict[str, int]


def encode_plan(config: EncodeConfig, write: WriteConfig, read: ReadConfig | None = None) -> Plan:
    """The checked plan: read → preprocess → effnet (→ Stage A) → CLIP text → CLIP image → write."""
    read = read or ReadConfig(source=config.shards, validate=config.validate)
    prep = PreprocessStepConfig(preprocess=config.preprocess, stage_a=config.stage_a is not None)
    steps = [
        PlannedStep(EncodeRead, read, config.read_resources),
        PlannedStep(PreprocessImages, prep, config.preprocess_resources),
        _effnet_step(config),
    ]
    if config.stage_a is not None:
        steps.append(PlannedStep(EncodeStageA, config.stage_a, config.stage_a_resources))
    steps += [
        PlannedStep(EncodeText, config.clip_text, config.clip_text_resources),
        PlannedStep(EncodeImage, config.clip_image, config.clip_image_resources),
        PlannedStep(WriteLatentParts, write, config.write_resources),
    ]
    plan = Plan(("shard_index", "uris"), steps)
    plan.check()
    return plan


def _effnet_step(config: EncodeConfig) -> PlannedStep:
    """The effnet actor pool; with Stage B sizes to store, the same actors encode them (one effnet each)."""
    cells = config.stored_stage_b_cells
    if not cells:
        return PlannedStep(EncodeEffnet, config.effnet, config.effnet_resources)
    return PlannedStep(
        EncodeEffnetStageB, EffnetStageBConfig.of(config.effnet, cells), config.effnet_resources
    )


def preprocessing_spec(config: EncodeConfig) -> dict[str, Any]:
    """Everything that changes the stored values besides the weights (hashed into every file's metadata).

    ``stage_b_conditioning`` is present only when Stage B columns are stored, so caches without them keep
    their hash.
    """
    from stages.flavors import get_flavor

    vision = get_flavor(config.clip_image.flavor).config
    spec = {
        "effnet": config.preprocess.spec(),
        "clip_image": vision.preprocess_spec(),
        "clip_text": {
            "tokenizer": "clip-bpe-49408",
            "max_length": 77,
            "pad_id": 0,
            "exclamation_as_pad": True,
        },
        "stage_a": config.stage_a is not None,
        "dtype": config.dtype,
        "clip_image_source": "scores" if config.scores_dir else "encode crop",
    }
    if config.stored_stage_b_cells:
        spec["stage_b_conditioning"] = {"mode": config.stage_b_mode, "cells": list(config.stored_stage_b_cells),
                                        "resize": "nearest", "input": "stage_a crop"}  # fmt: skip
    return spec


def read_config(config: EncodeConfig, store: CommitStore) -> ReadConfig:
    """The read step's config: the per-shard roots of kept keys and scores (older layouts converted once)."""
    roots = {}
    for name, field in (("kept_keys", "kept_keys"), ("scores", "scores_dir")):
        path = getattr(config, field)
        if path is not None:
            inputs = CommitStore(f"{store.root}/_inputs/{name}", store.options)
            roots[name], _ = open_per_shard(path, config.inputs_options, field=field, convert_to=inputs,
                                            schema_id=SCORES_IDS if name == "scores" else None)  # fmt: skip
    return ReadConfig(source=config.shards, storage_options=config.inputs_options, validate=config.validate,
                      **roots)  # fmt: skip


def fingerprint(metadata: Any) -> dict[str, Any]:
    return {"weights_sha256": metadata.weights_sha256, "preprocessing_hash": metadata.preprocessing_hash,
            "encoder_flavors": metadata.encoder_flavors}  # fmt: skip


def write_config(config: EncodeConfig) -> WriteConfig:
    """The writer's config: the files' metadata (fingerprint, Stage B conditioning) and what the rows carry."""
    metadata = fingerprint_metadata(config.encoders(), preprocessing_spec(config))
    metadata = dataclasses.replace(metadata, stage_b_conditioning=config.stage_b_metadata())
    return WriteConfig(output_dir=config.output_dir, metadata=metadata, dtype=config.dtype, formats=config.formats,
                       member_format=config.member_format, stage_a=config.stage_a is not None,
                       stage_b_cells=config.stored_stage_b_cells, endpoint_url=config.output_endpoint_url)  # fmt: skip


def run_encode(config: EncodeConfig) -> EncodeSummary:
    """Encode every uncommitted shard on the current Ray cluster, committing shards as they complete."""
    write = write_config(config)
    metadata = write.metadata
    encode_plan(config, write)  # config errors surface before any storage or cluster work
    store = CommitStore(config.output_dir, config.storage_options)
    shards = unique_shards(config.shards)
    on_stale = "refuse" if config.on_stale == "refuse" else "reencode"
    output = JobOutput(store, fingerprint(metadata), on_stale, redo="reencode")
    todo = set(output.start(shards))
    plan = encode_plan(config, write, read_config(config, store))
    new = run_and_commit(
        plan, [s for i, s in shards.items() if i in todo], Committer(store), _files, job="encode"
    )
    return _finish(config, output, metadata, new, shards, len(shards) - len(todo))


def _files(record: dict[str, Any]) -> dict[str, Any]:
    """A shard's commit record: its staged parts become its files (same names, moved into place)."""
    return {k: v for k, v in record.items() if k != "parts"} | {"files": record["parts"]}


def _finish(config: EncodeConfig, output: JobOutput, metadata: Any, new: dict, shards: dict,
            n_skipped: int) -> EncodeSummary:  # fmt: skip
    """Write the empty-caption embedding and, last, the manifest."""
    import ray

    store = output.store
    if not store.fs.exists(f"{store.path}/empty_caption.safetensors"):
        res = config.clip_text_resources
        task = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus)(encode_captions)
        clip_text, pooled = ray.get(task.remote(config.clip_text, [""]))
        from safetensors.numpy import save

        data = save(
            {"clip_text": clip_text[0].astype(np.float32), "clip_text_pooled": pooled[0].astype(np.float32)}
        )
        write_bytes(f"{store.root}/empty_caption.safetensors", data, store.options)
    records = output.records | new
    totals = _totals(records[s] for s in shards)
    summary = EncodeSummary(
        output_dir=config.output_dir, n_shards=len(shards), n_skipped_shards=n_skipped,
        n_encoded=totals.get("n_encoded", 0), n_rejected=totals.get("n_rejected", 0),
        reject_reasons={k.removeprefix("reason:"): v for k, v in totals.items() if k.startswith("reason:")},
        buckets={k.removeprefix("bucket:"): v for k, v in totals.items() if k.startswith("bucket:")},
    )  # fmt: skip
    output.finish(
        new, shards, schema="latents@1", layout=LAYOUT, encoder_flavors=metadata.encoder_flavors,
        random_weights=metadata.random_weights,
        weights_sha256=metadata.weights_sha256, preprocessing_hash=metadata.preprocessing_hash,
        preprocessing=preprocessing_spec(config), dtype=config.dtype, formats=list(config.formats),
        member_format=config.member_format, empty_caption="empty_caption.safetensors",
        stage_b_conditioning=config.stage_b_metadata() or {"mode": "none", "cells": [], "bytes_per_sample": 0},
        summary=dataclasses.asdict(summary), buckets=bucket_shapes(store, records.values(), config.formats[0]),
    )  # fmt: skip
    return summary


def bucket_shapes(store: CommitStore, records: Iterable[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """Per bucket: its tensor shapes and dtype, from one file's footer or header (O(buckets) reads)."""
    from pipelines.core.latents_reader import file_info

    first: dict[str, str] = {}
    for record in records:
        for f in record.get("files", ()):
            if isinstance(f, dict) and f["path"].startswith(f"{fmt}/"):
                first.setdefault(f["bucket"], f["path"])
    shapes = {}
    for bucket, path in sorted(first.items()):
        meta, _ = file_info(store.uri(path), fmt, storage_options=store.options)
        shapes[bucket] = {name: {"shape": list(spec.shape), "dtype": spec.dtype}
                          for name, spec in meta.tensor_shapes.items()}  # fmt: skip
    return shapes
