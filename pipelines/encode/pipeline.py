"""``cascade encode``: image–text shards → latent shards (Parquet and/or WebDataset), exactly once.

Pipeline (Ray Data, streaming with backpressure): shard rows → ``EncodeRead`` (tasks) →
``PreprocessImages`` (CPU tasks: decode, crop, bucket) → one actor pool per model (effnet, optional
Stage A, CLIP-bigG text, CLIP-L image) → ``WriteLatentParts`` (tasks). CPU decoding overlaps model work.

Exactly once: the writer stages parts under ``_staging/<shard>/``; the driver counts each input shard's
rows as they stream back and, when a shard is complete, commits it: moves its parts into ``parquet/`` and
``webdataset/`` (names start with the input shard id) and writes ``_commits/<shard>.json`` (one PUT). The
manifest is written last. A resubmitted job skips committed shards, clears the rest and redoes them; readers
only read committed files. A manifest whose encoder fingerprint (flavors, weights sha256, preprocessing
hash, dtype) differs from the config's is stale: refused, or re-encoded from scratch (``on_stale``).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipelines.core.commits import CommitStore
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.sources import SourceConfig, list_shards
from pipelines.core.step import Resources
from pipelines.core.storage import write_bytes
from pipelines.core.validate import ValidateConfig
from pipelines.encode.models import (
    EncodeEffnet,
    EncodeImage,
    EncoderConfig,
    EncodeStageA,
    EncodeText,
    encode_captions,
)
from pipelines.encode.steps import SHARD_ID, EncodeRead, PreprocessImages, PreprocessStepConfig, ReadConfig
from pipelines.encode.writer import WriteConfig, WriteLatentParts, fingerprint_metadata
from schemas.columns import KEY

ON_STALE = ("refuse", "reencode")


def _actor(num_cpus: float = 0.25) -> Resources:
    return Resources(num_cpus=num_cpus, concurrency=1, batch_size=32)


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    """An encode job.

    Attributes:
        shards: the image–text shards (``kind: webdataset``) from ingest or img2dataset.
        output_dir: where ``parquet/``, ``webdataset/``, ``_commits/`` and ``manifest.json`` go.
        kept_keys: ``kept_keys.parquet`` from filter (None: encode every sample).
        scores_dir: scores from ``cascade score``; their CLIP-L embeddings are reused instead of recomputed.
        preprocess: crop mode (``center`` or ``buckets``), image size (768), Stage A size (1024).
        validate: the ingest's sample checks, applied again (bad rows from upstream become rejects).
        effnet, clip_text, clip_image, stage_a: the encoders (``stage_a`` None: no Stage A latents). Required:
            released flavors need their weights; ``*/tiny`` flavors are seeded random weights for tests.
        dtype: stored tensor dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        formats: any of ``parquet`` and ``webdataset``; both are written from the same table.
        member_format: WebDataset tensor members: ``npy`` or ``safetensors``.
        on_stale: an existing output encoded with other weights/preprocessing: ``refuse`` or ``reencode``.
        *_resources: Ray resources per step (model steps are actor pools; set ``num_gpus`` on GPU nodes).
    """

    shards: SourceConfig
    output_dir: str
    kept_keys: str | None = None
    scores_dir: str | None = None
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    effnet: EncoderConfig = dataclasses.field(default_factory=lambda: EncoderConfig(flavor="effnet/tiny"))
    clip_text: EncoderConfig = dataclasses.field(
        default_factory=lambda: EncoderConfig(flavor="clip_text/tiny")
    )
    clip_image: EncoderConfig = dataclasses.field(
        default_factory=lambda: EncoderConfig(flavor="clip_vision/tiny")
    )
    stage_a: EncoderConfig | None = None
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

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.output_endpoint_url} if self.output_endpoint_url else {}

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


def encode_plan(config: EncodeConfig, write: WriteConfig) -> Plan:
    """The checked plan: read → preprocess → effnet (→ Stage A) → CLIP text → CLIP image → write."""
    read = ReadConfig(source=config.shards, kept_keys=config.kept_keys, scores_dir=config.scores_dir,
                      validate=config.validate)  # fmt: skip
    prep = PreprocessStepConfig(preprocess=config.preprocess, stage_a=config.stage_a is not None)
    steps = [
        PlannedStep(EncodeRead, read, config.read_resources),
        PlannedStep(PreprocessImages, prep, config.preprocess_resources),
        PlannedStep(EncodeEffnet, config.effnet, config.effnet_resources),
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


def preprocessing_spec(config: EncodeConfig) -> dict[str, Any]:
    """Everything that changes the stored values besides the weights (hashed into every file's metadata)."""
    from stages.flavors import get_flavor

    vision = get_flavor(config.clip_image.flavor).config
    return {
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


def _status_keys(shard_uri: str, options: dict[str, Any]) -> set[str] | None:
    """Keys the shard holds according to its img2dataset status Parquet (``NNNNN.parquet`` beside the tar)."""
    status = shard_uri[: -len(".tar")] + ".parquet"
    fs, path = fsspec.core.url_to_fs(status, **options)
    if not fs.exists(path):
        return None
    table = pq.read_table(fs.open(path, "rb"), columns=["key", "status"])
    return {
        k
        for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True)
        if s == "success"
    }


def expected_rows(config: EncodeConfig, shard: dict[str, Any]) -> int:
    """How many rows (encoded or rejected) a shard will produce: its samples, restricted to the kept keys."""
    from pipelines.core.sources import read_shard
    from pipelines.encode.steps import _keys_for_shard, _shard_id

    uri = shard["uris"][0]
    kept = (
        _keys_for_shard(config.kept_keys, _shard_id(uri), [], config.shards.storage_options)
        if config.kept_keys
        else None
    )
    keys = _status_keys(uri, config.shards.storage_options)
    if keys is None:  # no status file: count the rows (duplicates and unreadable members included) by reading
        keys = [str(k) for rows in read_shard(config.shards, shard) for k in rows[KEY]]
    return sum(1 for k in keys if kept is None or k in kept)


def _prepare(config: EncodeConfig, store: CommitStore, metadata: Any) -> dict[str, dict]:
    """Check the existing output against this config's fingerprint; returns the committed shards to skip."""
    manifest = store.read_json("manifest.json") or store.read_json("_fingerprint.json")
    current = {"weights_sha256": metadata.weights_sha256, "preprocessing_hash": metadata.preprocessing_hash,
               "encoder_flavors": metadata.encoder_flavors}  # fmt: skip
    if manifest is not None:
        old = {k: manifest.get(k) for k in current}
        if old != current:
            if config.on_stale == "refuse":
                raise ValueError(
                    f"output_dir={config.output_dir!r} holds latents encoded with {old}, but this config encodes "
                    f"with {current}; set on_stale=reencode to replace them, or choose another output_dir"
                )
            store.wipe()
    store.write_json("_fingerprint.json", current)
    return store.committed()


def run_encode(config: EncodeConfig) -> EncodeSummary:
    """Encode every uncommitted shard on the current Ray cluster, committing shards as they complete."""
    import ray

    from pipelines.encode.steps import _shard_id

    metadata = fingerprint_metadata(config.encoders(), preprocessing_spec(config))
    write = WriteConfig(output_dir=config.output_dir, metadata=metadata, dtype=config.dtype, formats=config.formats,
                        member_format=config.member_format, stage_a=config.stage_a is not None,
                        endpoint_url=config.output_endpoint_url)  # fmt: skip
    plan = encode_plan(config, write)
    store = CommitStore(config.output_dir, config.storage_options)
    committed = _prepare(config, store, metadata)
    all_shards = list_shards(config.shards)
    ids = Counter(_shard_id(s["uris"][0]) for s in all_shards)
    clashes = sorted(i for i, n in ids.items() if n > 1)
    if clashes:
        raise ValueError(f"shards.path={config.shards.path!r}: input shards share the ids {clashes[:5]} (output "
                         "names derive from the shard file names, which must be unique)")  # fmt: skip
    todo = [s for s in all_shards if _shard_id(s["uris"][0]) not in committed]
    expected = {_shard_id(s["uris"][0]): expected_rows(config, s) for s in todo}
    for shard_id in expected:
        store.clear_shard(shard_id)
    counts: dict[str, Counter] = {shard_id: Counter() for shard_id in expected}
    for shard_id in [s for s, n in expected.items() if n == 0]:
        committed[shard_id] = store.commit(shard_id, counts[shard_id])
    if any(expected.values()):
        ds = ray.data.from_items([s for s in todo if expected[_shard_id(s["uris"][0])]])
        # batch_size=None: every block as soon as it exists, so shards commit while the job runs
        for batch in plan.apply(ds).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for shard_id, n_encoded, n_rejected, buckets in zip(
                batch[SHARD_ID], batch["n_encoded"], batch["n_rejected"], batch["buckets"], strict=True
            ):
                counts[shard_id].update({"n_encoded": int(n_encoded), "n_rejected": int(n_rejected)})
                counts[shard_id].update({f"bucket:{b}": n for b, n in json.loads(buckets).items()})
                if counts[shard_id]["n_encoded"] + counts[shard_id]["n_rejected"] == expected[shard_id]:
                    committed[shard_id] = store.commit(shard_id, counts[shard_id])
    missing = sorted(set(expected) - set(committed))
    if missing:
        raise RuntimeError(f"shards {missing} did not produce their expected rows; rerun to redo them")
    return _finish(config, store, metadata, committed, len(all_shards) - len(todo))


def _finish(
    config: EncodeConfig, store: CommitStore, metadata: Any, committed: dict, n_skipped: int
) -> EncodeSummary:
    """Write the empty-caption embedding and, last, the manifest."""
    import ray

    if store.read_json("manifest.json") is None or not store.fs.exists(
        f"{store.path}/empty_caption.safetensors"
    ):
        res = config.clip_text_resources
        task = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus)(encode_captions)
        clip_text, pooled = ray.get(task.remote(config.clip_text, [""]))
        from safetensors.numpy import save

        data = save(
            {"clip_text": clip_text[0].astype(np.float32), "clip_text_pooled": pooled[0].astype(np.float32)}
        )
        write_bytes(f"{store.root}/empty_caption.safetensors", data, store.options)
    totals: Counter = Counter()
    for record in committed.values():
        totals.update({k: v for k, v in record.items() if k.startswith(("n_", "bucket:"))})
    reasons: Counter = Counter()
    for path in store.fs.glob(f"{store.path}/rejects/*.parquet"):
        reasons.update(pq.read_table(store.fs.open(path, "rb"), columns=["reason"])["reason"].to_pylist())
    summary = EncodeSummary(
        output_dir=config.output_dir, n_shards=len(committed), n_skipped_shards=n_skipped,
        n_encoded=totals["n_encoded"], n_rejected=totals["n_rejected"], reject_reasons=dict(reasons),
        buckets={k.removeprefix("bucket:"): v for k, v in sorted(totals.items()) if k.startswith("bucket:")},
    )  # fmt: skip
    manifest = {
        "schema": "latents@1", "encoder_flavors": metadata.encoder_flavors, "weights_sha256": metadata.weights_sha256,
        "preprocessing_hash": metadata.preprocessing_hash, "preprocessing": preprocessing_spec(config),
        "dtype": config.dtype, "formats": list(config.formats), "member_format": config.member_format,
        "empty_caption": "empty_caption.safetensors", "summary": dataclasses.asdict(summary),
        "shards": {k: committed[k] for k in sorted(committed)},
    }  # fmt: skip
    store.write_json("manifest.json", manifest)
    return summary
