"""Canonical column names shared by every record kind (pyarrow-free constants and name helpers).

Reject marking: while a batch flows through a pipeline, every row carries ``reject_step``,
``reject_reason`` and ``reject_detail`` (empty strings while the row is healthy). A step skips rows that
are already rejected and marks the rows it cannot process; the pipeline splits them off at the end into
the rejects table, so success and reject counts always add up to the input.
"""

from collections.abc import Iterable

# image–text samples (samples@1)
KEY = "key"
SOURCE = "source"
CAPTION = "caption"
IMAGE = "image"  # original encoded bytes
IMAGE_FORMAT = "image_format"  # "jpeg", "png", "webp", ...
WIDTH = "width"  # after EXIF orientation
HEIGHT = "height"
META_JSON = "meta_json"  # the sample's JSON sidecar as a string ("{}" when absent)

SAMPLE_COLUMNS = (KEY, SOURCE, CAPTION, IMAGE, IMAGE_FORMAT, WIDTH, HEIGHT, META_JSON)

# reject marking (rejects@1 stores key, source, step, reason, detail)
REJECT_STEP = "reject_step"
REJECT_REASON = "reject_reason"
REJECT_DETAIL = "reject_detail"
REJECT_COLUMNS = (REJECT_STEP, REJECT_REASON, REJECT_DETAIL)

# scores (scores@2; scores@1 lacks image_sha256 and phash)
PHASH = "phash"  # 64-bit perceptual hash (imagehash pHash) of the decoded image, as uint64
ASPECT_RATIO = "aspect_ratio"  # width / height
CAPTION_LENGTH = "caption_length"  # characters
AESTHETIC_SCORE = "aesthetic_score"  # LAION improved aesthetic predictor v2
CLIP_SIMILARITY = "clip_similarity"  # cosine(CLIP-L image, CLIP-L text)
CLIP_IMAGE_EMBEDS = "clip_image_embeds"  # CLIP-L image_embeds, unnormalised: Stage C's clip_img
WATERMARK_PROBABILITY = "watermark_probability"  # from the sample JSON when present
NSFW_PROBABILITY = "nsfw_probability"  # from the sample JSON when present

# dedup (dedup@1): one row per scored key
DUPLICATE_OF = "duplicate_of"  # the kept key this row duplicates; null for kept rows
DEDUP_KIND = "dedup_kind"  # "exact", "perceptual", "semantic" or "reference"; null for kept rows
DEDUP_SIMILARITY = "dedup_similarity"  # to duplicate_of: 1 (exact), 1 - hamming/64 (perceptual), cosine
DEDUP_CLUSTER = "dedup_cluster"  # the k-means cluster the row was compared in (-1: semantic off)
NN_SIMILARITY = "nn_similarity"  # cosine to its nearest neighbour in its cluster (NaN: alone)
DEDUP_COLUMNS = (KEY, SOURCE, DUPLICATE_OF, DEDUP_KIND, DEDUP_SIMILARITY, DEDUP_CLUSTER, NN_SIMILARITY)

# rejects (rejects@1): key, source, step, reason, detail
STEP = "step"  # the step that rejected the row
REASON = "reason"  # short machine-friendly reason ("decode_error", "too_small", ...)
DETAIL = "detail"  # free-form detail (exception text, truncated)
REJECT_RECORD_COLUMNS = (KEY, SOURCE, STEP, REASON, DETAIL)

# latent records (latents@1) and the export (export@1): scalar columns
SOURCE_SHARD = "source_shard"  # the image-text shard the sample came from
IMAGE_SHA256 = "image_sha256"  # sha256 of the original image bytes: part of the latent's cache key
BUCKET = "bucket"  # aspect bucket in latent cells, "WxH" (e.g. "24x24")
ORIG_WIDTH = "orig_width"  # original image size in pixels (after EXIF orientation)
ORIG_HEIGHT = "orig_height"
CROP_LEFT = "crop_left"  # deterministic crop box in original pixels
CROP_TOP = "crop_top"
CROP_RIGHT = "crop_right"
CROP_BOTTOM = "crop_bottom"

# latent records: tensor columns (shapes per row)
EFFNET = "effnet"  # EfficientNet latent, 16×h×w (Stage C space)
STAGE_A = "stage_a"  # optional Stage A latent, 4×H/4×W/4
CLIP_TEXT = "clip_text"  # CLIP-bigG text hidden states, 77×1280
CLIP_TEXT_POOLED = "clip_text_pooled"  # CLIP-bigG pooled text embedding, 1280 (Stage C: B×1×1280)
CLIP_IMG = "clip_img"  # CLIP-L image embedding, 768 (Stage C: B×1×768)
LATENT_TENSOR_COLUMNS = (EFFNET, STAGE_A, CLIP_TEXT, CLIP_TEXT_POOLED, CLIP_IMG)

# Optional Stage B conditioning columns, one per stored size: ``stage_b_effnet_{s}`` is the effnet latent
# (16×s×s) of the Stage A crop resized with NEAREST to 32s×32s px (official train_b.py's effnet input).
STAGE_B_EFFNET_PREFIX = "stage_b_effnet_"


def stage_b_effnet_column(cells: int) -> str:
    """The column of the Stage B effnet latent at ``cells``×``cells`` latent cells: 16 -> "stage_b_effnet_16"."""
    if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
        raise ValueError(f"cells={cells!r} must be a positive int")
    return f"{STAGE_B_EFFNET_PREFIX}{cells}"


def stage_b_effnet_cells(name: str) -> int | None:
    """Inverse of :func:`stage_b_effnet_column`: "stage_b_effnet_16" -> 16; None for any other name."""
    digits = name[len(STAGE_B_EFFNET_PREFIX) :] if name.startswith(STAGE_B_EFFNET_PREFIX) else ""
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0"):
        return None
    return int(digits)


def stage_b_cells_of(names: Iterable[str]) -> tuple[int, ...]:
    """The stored Stage B sizes among column names (e.g. a file's ``tensor_shapes`` keys), ascending."""
    return tuple(sorted({s for s in map(stage_b_effnet_cells, names) if s is not None}))


def is_latent_tensor_column(name: str) -> bool:
    """A tensor column latents@1 and export@1 may hold: the fixed ones and any ``stage_b_effnet_{s}``."""
    return name in LATENT_TENSOR_COLUMNS or stage_b_effnet_cells(name) is not None
