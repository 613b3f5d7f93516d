"""Hostile input and secrets: tar path traversal, pickles, and credentials in logs.

Covered elsewhere: the SSRF guard (tests/pipelines/test_ssrf.py, test_ingest_urls.py), decompression bombs
(tests/pipelines/test_images.py), unsafe YAML tags (tests/jobs/test_config.py), pickled weights
(tests/stages/test_weights.py, test_conditioners.py, test_scorers.py), public exposure of the dashboard in
the manifests (tests/cluster/test_manifests.py) and secrets in submitted jobs (tests/cluster/).
"""

from __future__ import annotations

import ast
import io
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from pipelines.core.sources import SourceConfig
from pipelines.ingest.existing import IngestConfig, run_ingest
from tests.conftest import REPO_ROOT
from tests.pipelines.photos import captions, jpeg, photo_tar
from tests.s3 import moto_endpoint

PROJECT_PACKAGES = ("schemas", "stages", "pipelines", "jobs", "cluster")


def traversal_tar() -> bytes:
    """A real photo, then members whose paths escape the extraction folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        members = {
            "good.jpg": jpeg("coffee"), "good.txt": captions()["coffee"].encode(),
            "../escape.jpg": jpeg("rocket"), "../escape.txt": b"a caption",
            "/tmp/absolute.jpg": jpeg("rocket"), "deep/../../up.jpg": jpeg("rocket"),
            "win\\..\\back.jpg": jpeg("rocket"),
        }  # fmt: skip
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_members_with_path_traversal_are_rejected_never_written(ray_local, tmp_path) -> None:
    src = tmp_path / "inside" / "src"
    src.mkdir(parents=True)
    (src / "00000.tar").write_bytes(traversal_tar())
    out = tmp_path / "inside" / "shards"
    summary = run_ingest(
        IngestConfig(source=SourceConfig(kind="webdataset", path=str(src)), output_dir=str(out))
    )
    assert summary.n_samples == 1 and summary.n_rejected == 5
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert {r["reason"] for r in rejects} == {"unsafe tar member path"}
    assert {r["detail"] for r in rejects} == {"../escape.jpg", "../escape.txt", "/tmp/absolute.jpg",
                                              "deep/../../up.jpg", "win\\..\\back.jpg"}  # fmt: skip
    with tarfile.open(out / "00000.tar") as tar:
        assert sorted(tar.getnames()) == ["good.jpg", "good.json", "good.txt"]
    for escaped in ("escape.jpg", "up.jpg", "back.jpg"):
        assert not list(tmp_path.rglob(escaped))
    assert not Path("/tmp/absolute.jpg").exists()


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            out.append(node)
    return out


def test_project_code_never_unpickles() -> None:
    """Weights are safetensors: no pickle/torch.load in the project, except the LAION aesthetic head, whose
    only release is a .pth, read with ``weights_only=True`` (tensors only, no code)."""
    loads = []
    for package in PROJECT_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for name in ("pickle.load", "pickle.loads", "torch.load", "np.load", "numpy.load", "yaml.load"):
                for call in _calls(tree, name):
                    loads.append((path.relative_to(REPO_ROOT).as_posix(), name, call))
    for path, name, call in loads:
        keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name == "torch.load":
            assert path == "stages/scorers.py" and keywords.get("weights_only") == "True", (
                path,
                ast.unparse(call),
            )
        elif name in ("np.load", "numpy.load"):
            assert keywords.get("allow_pickle") == "False", (path, ast.unparse(call))
        else:
            raise AssertionError(f"{path}: {ast.unparse(call)}")


def test_credentials_never_appear_in_output_or_ray_logs(tmp_path) -> None:
    """A real job reads from S3 with a secret key in the environment; nothing it prints or logs contains it."""
    secret = "FAKEsecret" + secrets.token_hex(12)
    key_id = "AKIAFAKE" + secrets.token_hex(6).upper()
    with moto_endpoint() as endpoint:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, key=key_id, secret=secret)
        fs.mkdir("security-test-bucket")
        fs.pipe("security-test-bucket/src/00000.tar", photo_tar(("coffee",)))
        ray_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a limit
        env = os.environ | {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                            "RAY_TMPDIR": str(ray_dir), "RAY_ADDRESS": ""}  # fmt: skip
        args = [sys.executable, "-m", "jobs.cli", "ingest", "--set", "existing.source.kind=webdataset",
                "--set", "existing.source.path=s3://security-test-bucket/src",
                "--set", f"existing.source.endpoint_url={endpoint}",
                "--set", f"existing.output_dir={tmp_path / 'shards'}"]  # fmt: skip
        result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"n_samples": 1' in result.stdout
    texts = [result.stdout, result.stderr]
    texts += [
        p.read_text(errors="replace")
        for p in ray_dir.rglob("*")
        if p.is_file() and p.suffix in (".out", ".err", ".log", ".txt")
    ]
    assert len(texts) > 3  # the Ray session's logs were found and read
    shutil.rmtree(ray_dir, ignore_errors=True)
    for text in texts:
        assert secret not in text and key_id not in text
