"""Existing image–text data as sample records: WebDataset tars, Parquet with image bytes, image folders.

A source is split into *shards* (one tar, one Parquet file, or a fixed group of folder keys); each shard is
read by one task into batches of sample rows (``schemas.columns.SAMPLE_COLUMNS`` minus the fields the
validate step fills in). Reading never raises for bad data: an unreadable file, a corrupt tar member or a
tar member with an unsafe path becomes a row marked rejected (step ``read``), so counts add up.

Which member or file is an image follows the one format policy of ``pipelines.core.images``
(``IMAGE_EXTENSIONS``; a sample's image is the first of those it has), and so does every reader.

- **Duplicate keys**: in every source kind the first sample of a key is kept and every later one is the reject
  "duplicate key" (a tar that repeats a key, a Parquet key column with repeats, or two folder images with the
  same name and different extensions).
- **Folders**: every file under the folder (outside ``_*``/``.*`` sub-folders, where staging and commit records
  live) is accounted for: an image with its sidecars ``<name>.txt`` (caption) and ``<name>.json``
  (metadata) is a sample keyed by its path below the folder without extension; any other file is a reject:
  "unsupported file type .bin", "sidecar without image" (a ``.txt``/``.json`` with no image of its name),
  "duplicate key" or "duplicate sidecar" (``x.txt`` and ``x.TXT``). So ``files = samples + rejects +
  sidecars`` over the folder.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.images import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS
from pipelines.core.step import Batch, object_column
from schemas.columns import CAPTION, IMAGE, KEY, META_JSON, REJECT_DETAIL, REJECT_REASON, REJECT_STEP, SOURCE

SOURCE_KINDS = ("webdataset", "parquet", "folder")
READ_COLUMNS = (KEY, SOURCE, CAPTION, IMAGE, META_JSON, REJECT_STEP, REJECT_REASON, REJECT_DETAIL)


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Where existing samples live and how to read them.

    Attributes:
        kind: ``webdataset`` (tars: key.<image extension> + key.txt + key.json), ``parquet`` (image bytes in
            a column) or ``folder`` (images with sidecar ``.txt`` captions and optional ``.json``).
        path: a directory, a file, or a glob; local or any fsspec URL (``s3://bucket/prefix/*.tar``).
        image_column: Parquet column with the encoded bytes (a list column uses its first image; an HF
            ``{bytes, path}`` struct uses ``bytes``).
        caption_column: Parquet column with the caption.
        key_column: Parquet column with a unique key; None derives ``<shard:05d><row:07d>``.
        samples_per_shard: folder keys (an image with its sidecars, or a file that is rejected) per shard.
        batch_rows: rows per batch yielded by a shard reader.
        endpoint_url: S3-compatible endpoint (None: AWS defaults); credentials come from the environment.
    """

    kind: str
    path: str
    image_column: str = "image"
    caption_column: str = "caption"
    key_column: str | None = None
    samples_per_shard: int = 1000
    batch_rows: int = 256
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"kind={self.kind!r}; allowed: {', '.join(SOURCE_KINDS)}")
        if not self.path:
            raise ValueError("path must name a file, directory or glob")
        if self.samples_per_shard < 1 or self.batch_rows < 1:
            raise ValueError(
                f"samples_per_shard={self.samples_per_shard} and batch_rows={self.batch_rows} must be >= 1"
            )

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}


def _filesystem(config: SourceConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(config.path, **config.storage_options)
    return fs, root


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _hidden(relpath: str) -> bool:
    """A path below the root inside a ``_`` or ``.`` folder: staging, commit records, converted copies."""
    return any(part.startswith(("_", ".")) for part in relpath.split("/")[:-1])


def _find(config: SourceConfig, extensions: tuple[str, ...]) -> list[str]:
    fs, root = _filesystem(config)
    if fs.isdir(root):
        base = root.rstrip("/") + "/"
        paths = [p for p in fs.find(root)
                 if p.rsplit(".", 1)[-1].lower() in extensions and not _hidden(p[len(base):])]  # fmt: skip
    elif any(ch in root for ch in "*?["):
        paths = fs.glob(root)
    else:
        paths = [root] if fs.exists(root) else []
    if not paths:
        raise FileNotFoundError(f"source.path={config.path!r}: no {'/'.join(extensions)} files found")
    return sorted(_unstrip(fs, p) for p in paths)


def _split_file(path: str) -> tuple[str, str]:
    """A folder file's stem and extension (lower case, no dot; ``""`` for none: ``.DS_Store``, ``README``)."""
    stem, ext = posixpath.splitext(path)
    return stem, ext.lstrip(".").lower()


def _folder_base(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """The folder keys are relative to: the folder itself, a glob's fixed part, or a single file's folder."""
    if any(ch in root for ch in "*?["):
        fixed = root[: min(root.index(ch) for ch in "*?[" if ch in root)]
        return fixed.rsplit("/", 1)[0] if "/" in fixed else ""
    return root.rstrip("/") if fs.isdir(root) else posixpath.dirname(root)


def _folder_files(config: SourceConfig) -> list[str]:
    """Every file of a folder source: the folder's files (outside ``_*``/``.*`` sub-folders), or a glob's or
    single file's matches plus the ``.txt``/``.json`` sidecars next to them."""
    fs, root = _filesystem(config)
    if fs.isdir(root):
        base = root.rstrip("/") + "/"
        return sorted(p for p in fs.find(root) if not _hidden(p[len(base) :]))
    if any(ch in root for ch in "*?["):
        matched = [p for p, info in fs.glob(root, detail=True).items() if info.get("type") != "directory"]
    else:
        matched = [root] if fs.exists(root) else []
    stems = {_split_file(p)[0] for p in matched if _split_file(p)[1] in IMAGE_EXTENSIONS}
    sidecars = [p for parent in sorted({posixpath.dirname(s) for s in stems}) for p in fs.ls(parent, detail=False)
                if _split_file(p)[0] in stems and _split_file(p)[1] in SIDECAR_EXTENSIONS]  # fmt: skip
    return sorted({*matched, *sidecars})


def _by_stem(paths: list[str]) -> dict[str, list[str]]:
    """Folder files grouped by stem (an image and its sidecars), groups in path order, files in path order with
    lower-case extensions first (``x.txt`` before ``x.TXT``)."""
    groups: dict[str, list[str]] = {}
    for path in sorted(paths):
        groups.setdefault(_split_file(path)[0], []).append(path)
    return {stem: sorted(files, key=lambda f: (not f.endswith(f.rsplit(".", 1)[-1].lower()), f))
            for stem, files in groups.items()}  # fmt: skip


def shard_id(uri: str) -> str:
    """An input shard's id: its file name without extension (``.../00012.tar`` → ``00012``)."""
    return posixpath.basename(uri.rstrip("/")).split(".", 1)[0]


def list_shards(config: SourceConfig) -> list[dict[str, Any]]:
    """One row per shard: ``{"shard_index", "uris"}``, in a stable order (shard ids name the outputs).

    A folder shard's ``uris`` are all its files (images, sidecars, others), ``samples_per_shard`` keys each.
    """
    if config.kind == "webdataset":
        groups = [[p] for p in _find(config, ("tar",))]
    elif config.kind == "parquet":
        groups = [[p] for p in _find(config, ("parquet",))]
    else:
        fs, _ = _filesystem(config)
        files = _folder_files(config)
        if not files:
            raise FileNotFoundError(f"source.path={config.path!r}: no files found")
        stems = list(_by_stem(files).values())
        n = config.samples_per_shard
        groups = [[_unstrip(fs, p) for g in stems[i : i + n] for p in g] for i in range(0, len(stems), n)]
    return [{"shard_index": i, "uris": uris} for i, uris in enumerate(groups)]


def unique_shards(source: SourceConfig) -> dict[str, dict[str, Any]]:
    """The source's shards by id (output names derive from the shard file names, which must be unique)."""
    shards: dict[str, dict[str, Any]] = {}
    for shard in list_shards(source):
        sid = shard_id(shard["uris"][0])
        if sid in shards:
            raise ValueError(
                f"shards.path={source.path!r}: {shard['uris'][0]} and {shards[sid]['uris'][0]} share the id "
                f"{sid!r} (output names derive from the shard file names, which must be unique)"
            )
        shards[sid] = shard
    return shards


class _Rows:
    """Accumulates rows and hands them out as column batches of ``batch_rows``; a sample whose key an earlier
    sample of the shard had becomes the reject "duplicate key" (the first is kept)."""

    def __init__(self, batch_rows: int) -> None:
        self.batch_rows = batch_rows
        self.rows: list[dict[str, Any]] = []
        self.keys: dict[str, str] = {}  # sample key -> where its first sample came from

    def first(self, key: str, source: str, where: str) -> bool:
        """Claim ``key`` for the sample of ``source`` described by ``where``; False (and a "duplicate key"
        reject row) if an earlier sample has it."""
        if key in self.keys:
            detail = f"{where}: key {key!r} already holds the sample of {self.keys[key]}; the first is kept"
            self.add(key, source, reject=("duplicate key", detail))
            return False
        self.keys[key] = where
        return True

    def add(self, key: str, source: str, *, caption: Any = None, image: Any = None, meta: str = "{}",
            reject: tuple[str, str] | None = None) -> None:  # fmt: skip
        reason, detail = reject or ("", "")
        self.rows.append(
            {KEY: key, SOURCE: source, CAPTION: caption, IMAGE: image, META_JSON: meta,
             REJECT_STEP: "read" if reject else "", REJECT_REASON: reason, REJECT_DETAIL: detail}
        )  # fmt: skip

    def drain(self, *, final: bool = False) -> Iterator[Batch]:
        while self.rows and (final or len(self.rows) >= self.batch_rows):
            chunk, self.rows = self.rows[: self.batch_rows], self.rows[self.batch_rows :]
            yield {c: object_column(r[c] for r in chunk) for c in READ_COLUMNS}


def caption_text(value: Any) -> str:
    """A caption as read (str, UTF-8 bytes or None) as text; undecodable bytes become U+FFFD."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value or "")


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def _add_sample(rows: _Rows, key: str, source: str, parts: dict[str, bytes]) -> None:
    """One WebDataset sample: its image is the first member in ``IMAGE_EXTENSIONS`` order."""
    if not rows.first(key, source, f"members {', '.join(f'{key}.{e}' for e in parts)}"):
        return
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if image_ext is None:
        members = ", ".join(f"{key}.{e}" for e in sorted(parts))
        rows.add(key, source, reject=("missing image", f"members {members}: none has an image extension"))
        return
    meta = parts.get("json", b"{}").decode("utf-8", errors="replace")
    rows.add(key, source, caption=parts.get("txt"), image=parts[image_ext], meta=meta)


Member = tuple[str, str, bytes | None, tuple[str, str] | None]  # key, extension, data, problem


def _tar_members(uri: str, config: SourceConfig) -> Iterator[Member]:
    """Regular members of a tar, streamed; an unsafe path or a read failure comes as a problem."""
    last_key = posixpath.basename(uri)
    try:
        with (
            fsspec.open(uri, "rb", **config.storage_options) as f,
            tarfile.open(fileobj=f, mode="r|*") as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                if _unsafe(member.name):
                    yield member.name, "", None, ("unsafe tar member path", member.name)
                    continue
                last_key, ext = _split_member(member.name)
                yield last_key, ext, tar.extractfile(member).read(), None
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield last_key, "", None, ("corrupt tar member", f"{type(exc).__name__}: {exc}")


def _read_tar(uri: str, config: SourceConfig) -> Iterator[Batch]:
    rows = _Rows(config.batch_rows)
    current, parts = None, {}
    for key, ext, data, problem in _tar_members(uri, config):
        if problem is not None:
            if current is not None and key != current:
                _add_sample(rows, current, uri, parts)
            rows.add(key, uri, reject=problem)  # a corrupt member takes the partial sample with it
            current, parts = None, {}
        else:
            if current is not None and (key != current or ext in parts):  # a repeated member: same key again
                _add_sample(rows, current, uri, parts)
                parts = {}
            current = key
            parts[ext] = data
        yield from rows.drain()
    if current is not None:
        _add_sample(rows, current, uri, parts)
    yield from rows.drain(final=True)


def _first_image(value: Any) -> Any:
    """Image bytes from a binary, a list of binaries (first) or an HF ``{bytes, path}`` struct."""
    if isinstance(value, list):
        return _first_image(value[0]) if value else None
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def _read_parquet(uri: str, shard_index: int, config: SourceConfig) -> Iterator[Batch]:
    rows = _Rows(config.batch_rows)
    try:
        with fsspec.open(uri, "rb", **config.storage_options) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            for needed in (config.image_column, config.caption_column, config.key_column):
                if needed is not None and needed not in names:
                    raise KeyError(f"column {needed!r} not in {sorted(names)}")
            columns = [c for c in (config.image_column, config.caption_column, config.key_column) if c]
            offset = 0
            for record_batch in pf.iter_batches(
                batch_size=config.batch_rows, columns=list(dict.fromkeys(columns))
            ):
                data = record_batch.to_pydict()
                for i in range(record_batch.num_rows):
                    key = (
                        str(data[config.key_column][i])
                        if config.key_column
                        else f"{shard_index:05d}{offset + i:07d}"
                    )
                    caption = data[config.caption_column][i]
                    if rows.first(key, uri, f"row {offset + i}"):
                        rows.add(key, uri, caption=caption, image=_first_image(data[config.image_column][i]))
                offset += record_batch.num_rows
                yield from rows.drain()
    except (OSError, KeyError, pa.ArrowException) as exc:
        rows.add(f"{shard_index:05d}", uri, reject=("unreadable parquet", f"{type(exc).__name__}: {exc}"))
    yield from rows.drain(final=True)


def _read_folder(uris: list[str], config: SourceConfig) -> Iterator[Batch]:
    """Every file of the shard becomes a sample (an image, with its sidecars), a reject, or a sidecar."""
    rows = _Rows(config.batch_rows)
    fs, root = _filesystem(config)
    base = _unstrip(fs, _folder_base(fs, root)).rstrip("/")

    def relative(path: str) -> str:
        return path[len(base) + 1 :] if base and path.startswith(base + "/") else posixpath.basename(path)

    order = {e: i for i, e in enumerate(IMAGE_EXTENSIONS)}
    for stem, files in _by_stem(uris).items():
        key = relative(stem)
        images = sorted(
            (f for f in files if _split_file(f)[1] in order), key=lambda f: order[_split_file(f)[1]]
        )
        sidecars: dict[str, str] = {}
        for path in files:
            if images and _split_file(path)[1] in SIDECAR_EXTENSIONS:
                sidecars.setdefault(_split_file(path)[1], path)  # the sample's caption / metadata
        if images:  # its image is the first in IMAGE_EXTENSIONS order, as in a tar
            _folder_sample(
                rows, fs, key, images[0], sidecars.get("txt"), sidecars.get("json"), relative(images[0])
            )
        for path in files:  # every other file: a reject
            ext = _split_file(path)[1]
            if path in images[1:]:
                rows.first(key, path, relative(path))  # a "duplicate key"
            elif ext in SIDECAR_EXTENSIONS and images and sidecars[ext] != path:  # x.txt and x.TXT
                rows.add(
                    relative(path),
                    path,
                    reject=("duplicate sidecar", f"{key}: {relative(sidecars[ext])} is used"),
                )
            elif ext in SIDECAR_EXTENSIONS and not images:
                detail = f"{relative(path)}: no image named {key}.<image extension> next to it"
                rows.add(relative(path), path, reject=("sidecar without image", detail))
            elif ext not in order and ext not in SIDECAR_EXTENSIONS:
                reason = f"unsupported file type .{ext}" if ext else "unsupported file type (no extension)"
                detail = f"{relative(path)}: neither an image extension nor a .txt/.json sidecar"
                rows.add(relative(path), path, reject=(reason, detail))
        yield from rows.drain()
    yield from rows.drain(final=True)


def _folder_sample(rows: _Rows, fs: fsspec.AbstractFileSystem, key: str, image: str, txt: str | None,
                   meta: str | None, where: str) -> None:  # fmt: skip
    if not rows.first(key, image, where):
        return
    try:
        data = fs.cat_file(image)
        caption = fs.cat_file(txt) if txt else None
        meta_json = fs.cat_file(meta).decode("utf-8", "replace") if meta else "{}"
    except OSError as exc:
        rows.add(key, image, reject=("unreadable file", f"{type(exc).__name__}: {exc}"))
        return
    rows.add(key, image, caption=caption, image=data, meta=meta_json)


def read_shard(config: SourceConfig, shard: dict[str, Any]) -> Iterator[Batch]:
    """Batches of sample rows (``READ_COLUMNS``) from one shard of ``list_shards``."""
    uris = list(shard["uris"])
    if config.kind == "webdataset":
        yield from _read_tar(uris[0], config)
    elif config.kind == "parquet":
        yield from _read_parquet(uris[0], int(shard["shard_index"]), config)
    else:
        yield from _read_folder(uris, config)
