"""URL-list ingest: real LAION URL paths served from 127.0.0.1, downloaded by img2dataset (Ray and multiprocessing)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from pipelines.core.shards import STATUS_SCHEMA, shard_files
from pipelines.ingest.ssrf import UrlPolicy
from pipelines.ingest.urls import REJECTS_SCHEMA, UrlIngestConfig, ingest_urls, read_url_list, short_reason
from tests.pipelines.hostile_http import Site, body, endless, gzip_bomb, photo, png_claiming, redirect
from tests.pipelines.http_server import PhotoServer, photos

LAION = Path(__file__).resolve().parents[1] / "data" / "laion_urls_200.parquet"
N_ROWS = 40
NOT_FOUND = {1, 5, 9, 13}
HTML = {2, 17, 30}
HANG = {3, 22}
LOOPBACK = UrlPolicy(allow_networks=("127.0.0.0/8",))


@pytest.fixture(scope="module")
def server():
    with PhotoServer(hang_s=3.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def url_list(server, tmp_path_factory) -> Path:
    """The first 40 LAION rows, rewritten to the local server; some rows 404, answer HTML or hang."""
    table = pq.read_table(LAION).slice(0, N_ROWS)
    urls = server.serve_urls(table["URL"].to_pylist(), not_found=NOT_FOUND, html=HTML, hang=HANG)
    path = tmp_path_factory.mktemp("lists") / "laion_local.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": table["TEXT"]}), path)
    return path


def existing_stats_keys() -> list[str]:
    """The ``_stats.json`` keys ingest of existing data writes."""
    files, _ = shard_files([], 0)
    return list(json.loads(files["00000_stats.json"]))


def _config(url_list: Path, output_dir: Path, **overrides) -> UrlIngestConfig:
    base = dict(
        input_path=str(url_list),
        output_dir=str(output_dir),
        url_col="URL",
        caption_col="TEXT",
        timeout_s=1.0,
        thread_count=16,
        number_sample_per_shard=16,
        url_policy=LOOPBACK,
    )
    return UrlIngestConfig(**(base | overrides))


def _read_tars(output_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(output_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_ingest_on_ray_keeps_originals_and_rejects_every_failure(
    ray_local, server, url_list, tmp_path, capsys
):
    out = tmp_path / "shards"
    result = ingest_urls(_config(url_list, out, distributor="ray"))
    # the driver's progress, from img2dataset's per-shard stats: every shard, its successes and failures
    shards = -(-N_ROWS // 16)
    line = next(x for x in reversed(capsys.readouterr().err.splitlines()) if x.startswith("ingest: "))
    assert line.startswith(f"ingest: {shards}/{shards} shards, {result.n_success} samples (")
    assert f", {N_ROWS - result.n_success} rejects, " in line

    assert result.n_input == N_ROWS
    assert result.n_success + result.n_rejected == N_ROWS
    assert result.n_success == N_ROWS - len(NOT_FOUND | HTML | HANG)
    table = pq.read_table(out / "rejects")
    rejects = table.to_pylist()
    reasons = {r["row_index"]: r["reason"] for r in rejects}
    # an HTML page is refused by its Content-Type before anything decodes it
    assert reasons == {i: "http 404" for i in NOT_FOUND} | {i: "wrong content type" for i in HTML} | {
        i: "timeout" for i in HANG
    }
    assert result.reject_reasons == {"http 404": 4, "wrong content type": 3, "timeout": 2}
    assert all(r["step"] == "ingest" and r["key"] and r["detail"] for r in rejects)
    assert table.schema.remove_metadata().equals(REJECTS_SCHEMA)

    # img2dataset's layout: NNNNN.tar/.parquet/_stats.json per shard of 16 URLs, committed one by one
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"0000{i}{ext}" for i in range(3) for ext in (".tar", ".parquet", "_stats.json")]
        + ["rejects", "_commits", "manifest.json"]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        sorted(manifest["shards"]) == ["00000", "00001", "00002"]
        and manifest["totals"]["n_samples"] == result.n_success
    )
    stats = [json.loads((out / f"0000{i}_stats.json").read_text()) for i in range(3)]
    assert sum(s["count"] for s in stats) == N_ROWS
    assert sum(s["successes"] for s in stats) == result.n_success
    # ingest of existing data writes img2dataset's own status columns (same types) and stats keys
    status = pq.read_schema(out / "00000.parquet")
    own = [f for f in status if f.name != "row_index"]  # img2dataset's columns (row_index is ours)
    assert own and all(STATUS_SCHEMA.field(f.name).type == f.type for f in own), status
    assert {"url", "caption"} <= set(STATUS_SCHEMA.names)
    assert set(stats[0]) - {"start_time", "end_time"} <= set(existing_stats_keys())

    captions = pq.read_table(LAION)["TEXT"].to_pylist()
    samples = _read_tars(out)
    assert len(samples) == result.n_success
    for key, members in samples.items():
        assert set(members) == {"jpg", "txt", "json"}
        meta = json.loads(members["json"])
        row = meta["row_index"]
        assert meta["key"] == key and meta["status"] == "success"
        assert members["txt"].decode() == captions[row]
        assert members["jpg"] == photos()[row % 4]  # resize_mode="no": the served bytes, untouched
    assert {r["row_index"] for r in rejects}.isdisjoint(
        json.loads(m["json"])["row_index"] for m in samples.values()
    )


def test_rerun_is_incremental_and_refuses_a_different_list(ray_local, server, url_list, tmp_path):
    out = tmp_path / "shards"
    first = ingest_urls(_config(url_list, out, distributor="ray", number_sample_per_shard=64))
    before = (out / "00000.tar").stat().st_mtime_ns
    again = ingest_urls(_config(url_list, out, distributor="ray", number_sample_per_shard=64))
    assert (out / "00000.tar").stat().st_mtime_ns == before  # complete shard not redone
    assert (again.n_success, again.reject_reasons) == (first.n_success, first.reject_reasons)

    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(url_list).slice(1), other)
    with pytest.raises(ValueError, match="different URL list"):
        ingest_urls(_config(other, out, distributor="ray", number_sample_per_shard=64))


def test_multiprocessing_with_center_crop_resizes(server, url_list, tmp_path):
    small = tmp_path / "small.csv"
    pa_csv.write_csv(pq.read_table(url_list).slice(0, 8), small)  # rows 1, 2, 3, 5 misbehave
    out = tmp_path / "resized"
    # one shard per URL in one process: the process is replaced after 5 shards (a Python 3.11
    # ProcessPoolExecutor hung there; a multiprocessing Pool does not)
    config = _config(small, out, distributor="multiprocessing", processes_count=1, number_sample_per_shard=1)
    config = UrlIngestConfig(**(config.__dict__ | {"resize_mode": "center_crop", "image_size_px": 64}))
    result = ingest_urls(config)
    assert (result.n_success, result.n_rejected) == (4, 4)
    samples = _read_tars(out)
    assert len(samples) == 4
    for members in samples.values():
        assert Image.open(io.BytesIO(members["jpg"])).size == (64, 64)


def test_default_policy_refuses_loopback_before_any_request(server, url_list, tmp_path):
    jsonl = tmp_path / "list.jsonl"
    rows = pq.read_table(url_list).to_pylist()
    jsonl.write_text("".join(json.dumps({"url": r["URL"], "caption": r["TEXT"]}) + "\n" for r in rows))
    requests_before = sum(server.requests.values())
    out = tmp_path / "refused"
    result = ingest_urls(
        UrlIngestConfig(input_path=str(jsonl), output_dir=str(out), distributor="multiprocessing")
    )

    assert (result.n_input, result.n_success, result.n_rejected) == (N_ROWS, 0, N_ROWS)
    rejects = pq.read_table(out / "rejects" / "refused.parquet")
    assert Counter(rejects["reason"].to_pylist()) == {"host resolves to loopback address 127.0.0.1": N_ROWS}
    assert rejects["key"].to_pylist() == [""] * N_ROWS
    assert rejects["row_index"].to_pylist() == list(range(N_ROWS))
    assert sum(server.requests.values()) == requests_before
    assert sorted(p.name for p in out.iterdir()) == ["_commits", "manifest.json", "rejects"]


def test_hostile_answers_become_rejects_and_nothing_internal_is_fetched(ray_local, tmp_path):
    """The issue's reproduction and its relatives, through ingest on Ray: the checked opener runs in the
    download workers. 127.0.0.2 is allowed; 127.0.0.3 stands in for the metadata address."""
    with Site("127.0.0.2") as public, Site("127.0.0.3") as internal:
        secret = internal.route("/latest/meta-data/iam.jpg", photo(1))
        public.route("/loop/b", redirect(public.url("/loop/a")))
        cases = {
            public.route("/ok.jpg", photo(0)): None,
            public.route("/moved.jpg", redirect(public.url("/ok.jpg"))): None,
            public.route("/iam.jpg", redirect(secret)): "redirect to a refused address",
            public.route("/file.jpg", redirect("file:///etc/passwd")): "redirect to a refused address",
            public.route("/loop/a", redirect(public.url("/loop/b"))): "redirect loop",
            public.route("/endless.jpg", endless(public)): "response larger than the byte cap",
            public.route("/bomb.jpg", body(gzip_bomb(), Content_Encoding="gzip")): "response larger than the byte cap",
            public.route("/pixels.png", body(png_claiming(100_000, 100_000), "image/png")): "image larger than max_pixels",
            public.route("/drip.jpg", endless(public, b"\xff" * 16, delay_s=0.05)): "download deadline exceeded",
            public.route("/page", body(b"<html></html>", "text/html")): "wrong content type",
            "http://169.254.169.254/latest/meta-data/iam/": "host resolves to link-local address 169.254.169.254 (cloud metadata)",
        }  # fmt: skip
        url_list = tmp_path / "hostile.csv"
        pa_csv.write_csv(
            pa.table({"url": list(cases), "caption": [f"case {i}" for i in range(len(cases))]}), url_list
        )
        out = tmp_path / "out"
        config = UrlIngestConfig(input_path=str(url_list), output_dir=str(out), timeout_s=1.0, deadline_s=2.0,
                                 max_response_bytes=1 << 20, number_sample_per_shard=8, thread_count=16,
                                 url_policy=UrlPolicy(allow_networks=("127.0.0.2/32",)))  # fmt: skip
        result = ingest_urls(config)
    assert internal.requests == {}  # nothing was ever asked of the refused address
    rejects = {r["source"]: r for r in pq.read_table(out / "rejects").to_pylist()}
    assert {url: rejects[url]["reason"] if url in rejects else None for url in cases} == cases
    assert rejects[public.url("/iam.jpg")]["detail"].endswith(f"chain: {public.url('/iam.jpg')} -> {secret}")
    assert (result.n_success, result.n_rejected) == (2, len(cases) - 2)
    assert sorted(m["jpg"] for m in _read_tars(out).values()) == [photos()[0]] * 2


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_read_url_list_formats_agree(url_list, tmp_path, fmt):
    table = pq.read_table(url_list).rename_columns(["url", "caption"])
    path = tmp_path / f"list.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:
        pa_csv.write_csv(table, path, pa_csv.WriteOptions(delimiter="\t" if fmt == "tsv" else ","))
    read = read_url_list(UrlIngestConfig(input_path=str(path), output_dir=str(tmp_path / "o")))
    assert read.column_names == ["url", "caption", "row_index"]
    assert read["url"].to_pylist() == table["url"].to_pylist()
    assert read["caption"].to_pylist() == table["caption"].to_pylist()
    assert read["row_index"].to_pylist() == list(range(N_ROWS))


def test_missing_column_is_named(url_list, tmp_path):
    with pytest.raises(ValueError, match=r"lacks columns \['url', 'caption'\]"):
        read_url_list(UrlIngestConfig(input_path=str(url_list), output_dir=str(tmp_path)))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"input_path": "list.txt"}, "input_path"),
        ({"input_format": "xlsx"}, "input_format"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"resize_mode": "border"}, "image_size_px"),
        ({"distributor": "spark"}, "distributor"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": -1}, "retries"),
        ({"thread_count": 0}, "thread_count"),
        ({"number_sample_per_shard": 0}, "number_sample_per_shard"),
        ({"encode_format": "png", "encode_quality": 95}, "encode_quality"),
        ({"caption_col": "url"}, "caption_col"),
        ({"additional_cols": ("width",)}, "additional_cols"),
        ({"incremental_mode": "extend"}, "incremental_mode"),
        ({"url_policy": {"allow_hosts": ["x"]}}, "url_policy"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        UrlIngestConfig(**({"input_path": "list.parquet", "output_dir": "out"} | overrides))


def test_ignored_options_warn():
    with pytest.warns(UserWarning, match="image_size_px"):
        UrlIngestConfig(input_path="l.parquet", output_dir="o", image_size_px=256)
    with pytest.warns(UserWarning, match="processes_count"):
        UrlIngestConfig(input_path="l.parquet", output_dir="o", distributor="ray", processes_count=4)


def test_ray_distributor_needs_an_initialised_ray(monkeypatch, url_list, tmp_path):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match=r"ray\.init"):
        ingest_urls(_config(url_list, tmp_path / "o", distributor="ray"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        ("failed_to_download", "HTTP Error 404: Not Found", "http 404"),
        ("failed_to_download", "HTTP Error 503: Service Unavailable", "http 503"),
        ("failed_to_download", "<urlopen error timed out>", "timeout"),
        ("failed_to_download", "The read operation timed out", "timeout"),
        ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "connection refused"),
        ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>", "dns error"),
        (
            "failed_to_download",
            "Use of image disallowed by X-Robots-Tag directive",
            "disallowed by X-Robots-Tag",
        ),
        ("failed_to_download", "hash mismatch", "hash mismatch"),
        ("failed_to_download", "something odd", "download error"),
        ("failed_to_resize", "Image decoding error", "image decoding error"),
        ("failed_to_resize", "image too small", "image too small"),
        ("failed_to_resize", "OpenCV(4.14) error: ...", "resize error"),
    ],
)
def test_short_reason(status, message, reason):
    assert short_reason(status, message) == reason
