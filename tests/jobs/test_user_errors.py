"""Config and path mistakes fail with one line naming the dotted field, exit 2, before any Ray session exists.

All mistakes run in one child process whose ``RAY_TMPDIR`` is fresh: afterwards it must still be empty (no
Ray session directory), and stderr must hold exactly one line per mistake with no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.config import ConfigError, random_weight_models
from jobs.preflight import preflight
from pipelines.core.sources import SourceConfig
from pipelines.encode.models import EncoderConfig
from pipelines.encode.pipeline import EncodeConfig
from tests import tiny

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ["effnet.flavor=effnet/tiny", "clip_text.flavor=clip_text/tiny", "clip_image.flavor=clip_vision/tiny"]

# Each: argv, then the text the one line must hold.
RUNNER = """
import json, sys
from jobs.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    results.append(main(argv))
print(json.dumps(results))
"""


def _encode(shards: str, output: str, *extra: str) -> list[str]:
    sets = [f"shards.path={shards}", f"output_dir={output}", *TINY, *extra]
    return ["encode", "--set", "shards.kind=webdataset", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")  # matched by the pattern; never read (the run stops before)
    (tmp_path / "a_file").write_text("not a folder")
    return {"root": tmp_path, "shards": shards}


def test_each_mistake_is_one_line_exit_2_and_no_ray_session(layout) -> None:
    root, shards = layout["root"], layout["shards"]
    unwritable = "/proc/cascade-test/out" if os.geteuid() == 0 else str(root / "ro" / "out")
    if os.geteuid() != 0:
        (root / "ro").mkdir(mode=0o500)
    cases = [
        (_encode(str(root / "nowhere" / "*.tar"), str(root / "out")),
         f"shards.path='{root}/nowhere/*.tar' matches no file or folder"),
        (_encode(str(shards / "*.tar"), str(root / "a_file")), f"output_dir='{root}/a_file' is a file"),
        (_encode(str(shards / "*.tar"), unwritable), f"output_dir='{unwritable}' is not writable"),
        (_encode(str(shards), str(shards / "latents")),
         f"output_dir='{shards}/latents' is inside the input shards.path='{shards}'"),
        (_encode(str(shards / "*.tar"), str(root / "out"), f"effnet.weights={root}/effnet.safetensors"),
         f"effnet.weights='{root}/effnet.safetensors' does not exist"),
        (["ingest", "--set", f"existing.source.path={root}/missing", "--set", "existing.source.kind=folder",
          "--set", f"existing.output_dir={root}/ingested"],
         f"existing.source.path='{root}/missing' matches no file or folder"),
        (["encode", "--set", "shards.kind=webdataset", "--set", f"shards.path={shards}",
          "--set", f"output_dir={root}/out"],
         "missing required config field(s): effnet, clip_text, clip_image"),
        (["train-c", "--set", f"data.path={root}/out", "--set", f"output_dir={root}/train"],
         "missing required config field(s): flavor"),
    ]  # fmt: skip
    ray_tmp = root / "ray_tmp"
    ray_tmp.mkdir()
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    argvs = [argv for argv, _ in cases]
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [2] * len(cases)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(cases), done.stderr  # one line each: no traceback, no warnings, no Ray output
    for line, ((argv, expected)) in zip(lines, cases, strict=True):
        assert line.startswith(f"cascade {argv[0]}: error: ") and expected in line, (line, expected)
    assert list(ray_tmp.iterdir()) == [], "a Ray session was started"


def test_invalid_yaml_is_a_config_error_naming_the_file(tmp_path, capsys) -> None:
    from jobs.cli import main

    (tmp_path / "bad.yaml").write_text("output_dir: [unclosed\n")
    assert main(["filter", "--config", str(tmp_path / "bad.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"cascade filter: error: {tmp_path / 'bad.yaml'}: invalid YAML (line 2")


def test_an_unexpected_error_is_one_line_with_the_traceback_file(tmp_path, monkeypatch, capsys) -> None:
    from jobs.cli import _failed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        {}["missing"]
    except KeyError as exc:
        assert _failed("encode", exc, verbose=False) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cascade encode: failed: 'missing' (traceback: ")
    log = line.split("traceback: ", 1)[1].split(";", 1)[0]
    assert log.startswith(str(tmp_path)) and "KeyError: 'missing'" in Path(log).read_text()


def test_random_weight_models_are_named_by_field(tmp_path) -> None:
    source = SourceConfig(kind="webdataset", path=str(tmp_path))
    config = EncodeConfig(shards=source, output_dir=str(tmp_path / "out"), **tiny.encoders())
    assert random_weight_models(config) == [
        "effnet.flavor=effnet/tiny", "clip_text.flavor=clip_text/tiny", "clip_image.flavor=clip_vision/tiny"
    ]  # fmt: skip
    weights = tmp_path / "effnet.safetensors"
    weights.write_bytes(b"")
    named = EncodeConfig(shards=source, output_dir=str(tmp_path / "out"),
                         **tiny.encoders(effnet=EncoderConfig(flavor="effnet/tiny", weights=str(weights))))  # fmt: skip
    assert "effnet.flavor=effnet/tiny" not in random_weight_models(named)
    from jobs.train_config import PreviewConfig, TrainConfig
    from pipelines.train_data.batches import TrainDataConfig

    train = TrainConfig(data=TrainDataConfig(path=str(tmp_path)), output_dir=str(tmp_path / "t"),
                        flavor="stage_c/1b", preview=PreviewConfig(every=10, previewer="previewer"))  # fmt: skip
    # the trained Stage C from scratch is not a random-weight model; a frozen released previewer without weights is
    assert random_weight_models(train) == ["preview.previewer=previewer"]


def test_preflight_passes_a_good_config_and_makes_the_output(tmp_path) -> None:
    (tmp_path / "shards").mkdir()
    config = EncodeConfig(shards=SourceConfig(kind="webdataset", path=str(tmp_path / "shards")),
                          output_dir=str(tmp_path / "deep" / "out"), **tiny.encoders())  # fmt: skip
    preflight(config)
    assert (tmp_path / "deep" / "out").is_dir()
    with pytest.raises(ConfigError, match="is inside the input"):
        preflight(EncodeConfig(shards=SourceConfig(kind="webdataset", path=str(tmp_path)),
                               output_dir=str(tmp_path / "deep"), **tiny.encoders()))  # fmt: skip


def test_quiet_mode_moves_ray_native_lines_off_the_terminal(tmp_path, capfd) -> None:
    from jobs.console import NativeLogFilter

    log = tmp_path / "native.log"
    native = NativeLogFilter(str(log))
    os.write(2, b"[2026-12-03 12:00:53,095 E 13640 13640] core_worker.cc:2465: Actor with class name: x\n")
    os.write(2, b"encode: 1/4 shards\rencode: 2/4 shards\r")  # a bar's redraws pass at once, no newline
    os.write(2, b"cascade: our own line\n")
    native.close()
    err = capfd.readouterr().err
    assert err == "encode: 1/4 shards\rencode: 2/4 shards\rcascade: our own line\n"
    assert log.read_text().startswith("[2026-12-03 12:00:53,095 E 13640 13640] core_worker.cc:2465")


def test_s3_paths_are_checked_with_their_sections_endpoints(tmp_path) -> None:
    import fsspec

    from pipelines.export.pipeline import ExportConfig
    from tests.s3 import moto_endpoint

    with moto_endpoint() as endpoint:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint)
        fs.mkdir("preflight-bucket")
        fs.pipe("preflight-bucket/cache/manifest.json", b"{}")
        fs.pipe("preflight-bucket/an-object", b"x")

        def export(latents: str, output: str) -> ExportConfig:
            return ExportConfig(latents=latents, output_dir=output, endpoint_url=endpoint,
                                output_endpoint_url=endpoint)  # fmt: skip

        preflight(
            export("s3://preflight-bucket/cache", "s3://preflight-bucket/export")
        )  # a prefix, and a new one
        with pytest.raises(
            ConfigError, match=r"latents='s3://preflight-bucket/missing' matches no object or prefix"
        ):
            preflight(export("s3://preflight-bucket/missing", "s3://preflight-bucket/export"))
        with pytest.raises(ConfigError, match=r"output_dir='s3://preflight-bucket/an-object' is an object"):
            preflight(export("s3://preflight-bucket/cache", "s3://preflight-bucket/an-object"))


def test_relative_paths_become_absolute_before_workers_see_them(tmp_path, monkeypatch) -> None:
    from jobs.preflight import absolute_paths
    from jobs.train_config import TrainConfig
    from pipelines.train_data.batches import TrainDataConfig

    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data=TrainDataConfig(path="cache"), output_dir="runs", flavor="stage_c/tiny",
                         storage_endpoint_url=None)  # fmt: skip
    resolved = absolute_paths(config)
    assert (resolved.data.path, resolved.output_dir) == (str(tmp_path / "cache"), str(tmp_path / "runs"))
    assert resolved.weights is None and resolved.data.empty_caption is None  # unset stays unset
    remote = TrainConfig(
        data=TrainDataConfig(path="s3://b/cache"), output_dir="s3://b/runs", flavor="stage_c/tiny"
    )
    assert absolute_paths(remote) == remote
