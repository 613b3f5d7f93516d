"""Stage C, LoRA and ControlNet training with Ray Train on a real latent cache (tiny flavors, 2 CPUs)."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.train import check_train, read_spec, run_train
from jobs.train_checkpoint import read_checkpoint
from jobs.train_config import ControlNetTrainConfig, EmaConfig, PreviewConfig, ScalingSpec, TrainConfig
from pipelines.train_data.batches import TrainDataConfig, window_micro_batches
from stages.flavors import build_model
from tests.jobs.train_cache import build_cache
from tests.jobs.train_runs import (
    kill_and_resume,
    loads_strictly_and_into_diffusers,
    metrics,
    two_workers_match,
)
from tests.s3 import moto_endpoint

# two Ray Train workers and the read tasks share CI's 2 CPUs
HALF_CPU = ScalingSpec(num_workers=1, cpus_per_worker=0.5)


@pytest.fixture(scope="module")
def cache(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """(image shards, latent cache) of 7 real photos: center crops at 256 px → one 8x8 bucket."""
    return build_cache(tmp_path_factory.mktemp("train"), mode="center", image_size_px=256)


def _config(cache: tuple[Path, Path], out: Path, **overrides) -> TrainConfig:
    fields = {"data": TrainDataConfig(path=str(cache[1]), read_cpus=0.25), "output_dir": str(out),
              "flavor": "stage_c/tiny", "allow_random_weights": True, "batch_size": 2, "max_steps": 6, "save_every": 2, "log_every": 1, "bf16_autocast": False,
              "scaling": HALF_CPU}  # fmt: skip
    return TrainConfig(**(fields | overrides))


def test_micro_batches_are_the_same_for_two_workers_and_one_with_double_accumulation(cache) -> None:
    two = _config(cache, Path("unused"), batch_size=4, scaling=dataclasses.replace(HALF_CPU, num_workers=2))
    one = _config(cache, Path("unused"), batch_size=4, grad_accum_steps=2)
    plan = check_train(one)
    assert plan.windows == check_train(two).windows
    by_one = {
        (b["step"], b["micro"]): b
        for w in plan.windows
        for b in window_micro_batches(w, read_spec(one, plan))
    }
    by_two = {}
    for rank in (0, 1):
        spec = dataclasses.replace(read_spec(two, plan), rank=rank)
        by_two |= {(b["step"], b["micro"]): b for w in plan.windows for b in window_micro_batches(w, spec)}
    assert sorted(by_one) == sorted(by_two) == [(s, j) for s in range(6) for j in (0, 1)]
    for key, batch in by_one.items():
        assert batch["key"] == by_two[key]["key"] and len(batch["key"].split("\n")) == 2
        assert np.array_equal(batch["effnet"], by_two[key]["effnet"])
    keys = [k for s in range(3) for j in (0, 1) for k in by_one[(s, j)]["key"].split("\n")]
    assert len(set(keys[:4])) == 4, "one global batch holds distinct samples"


@pytest.mark.slow  # 180 s; by default Stage C learns without Ray (tests/stages/test_objective.py) and trains through Ray Train in the worker-kill, FSDP, LoRA and ControlNet tests
def test_a_tiny_stage_c_learns_on_cached_photos(cache, tmp_path) -> None:
    """A few hundred steps on the cached latents: the loss ends clearly below its start."""
    config = _config(cache, tmp_path, batch_size=4, max_steps=300, save_every=150, log_every=10, lr=1e-3,
                     bf16_autocast=True, ema=EmaConfig(start_step=100, every=10, beta=0.9),
                     preview=PreviewConfig(every=150, samples=2, timesteps=4, previewer="previewer/tiny"))  # fmt: skip
    summary = run_train(config)
    assert (summary.start_step, summary.final_step) == (0, 300)
    rows = metrics(summary)
    assert [r["step"] for r in rows] == list(range(10, 301, 10))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    print(f"\ntiny Stage C on 7 cached photos: loss {first:.4f} (steps 10-30) -> {last:.4f} (steps 280-300)")
    assert last < 0.75 * first
    assert all(0 <= r["data_wait_fraction"] < 1 and r["samples_per_s"] > 0 and r["lr"] == 1e-3 for r in rows)
    checkpoint = Path(summary.checkpoint)
    assert checkpoint.name == "checkpoint_00000300"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == ["generator.safetensors", "generator_ema.safetensors", "optimizer.safetensors",
                     "preview.png", "trainer_state.json"]  # fmt: skip
    from PIL import Image

    preview = Image.open(checkpoint / "preview.png")
    assert preview.size == (2 * 64, 2 * 64)  # 2 samples wide, reference + sample rows, 8x8 latents → 64 px
    assert sorted(p.name for p in (tmp_path / "stage_c" / "previews").iterdir()) == [
        "step_00000150.png", "step_00000300.png"]  # fmt: skip
    weights, optimizer, state = read_checkpoint(checkpoint)
    assert state["step"] == 300 and optimizer["param_groups"][0]["lr"] == 1e-3
    assert not torch.equal(weights["generator_ema"]["clf.1.weight"], weights["generator"]["clf.1.weight"])
    _loads_strictly_and_into_diffusers(checkpoint / "generator.safetensors")


def _loads_strictly_and_into_diffusers(path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 16, 8, 8, generator=gen), "timestep_ratio": torch.rand(2, generator=gen),
              "clip_text": torch.randn(2, 77, 32, generator=gen), "clip_text_pooled": torch.randn(2, 1, 32, generator=gen),
              "clip_img": torch.randn(2, 1, 32)}  # fmt: skip
    loads_strictly_and_into_diffusers(path, "stage_c/tiny", inputs)


@pytest.fixture(scope="module")
def one_worker_run(cache, tmp_path_factory):
    """The reference run: 1 worker, accumulation 2, 16 steps, adaptive loss weight, checkpoints every 4."""
    out = tmp_path_factory.mktemp("one")
    config = _config(cache, out, batch_size=4, grad_accum_steps=2, max_steps=16, save_every=4,
                     adaptive_loss_weight=True)  # fmt: skip
    return config, run_train(config)


@pytest.mark.slow  # 76 s; by default two workers draw the same micro-batches as one (test_micro_batches_are_the_same_...)
def test_two_workers_match_one_worker_with_doubled_accumulation(cache, one_worker_run, tmp_path) -> None:
    s1, s2 = two_workers_match(*one_worker_run, tmp_path)
    np.testing.assert_allclose(
        s1["adaptive_loss"]["bucket_losses"], s2["adaptive_loss"]["bucket_losses"], rtol=1e-5
    )
    assert (s1["world_size"], s2["world_size"]) == (1, 2)


@pytest.mark.slow  # Stage C's resume runs by default in test_a_killed_train_worker_restarts_from_its_checkpoint
def test_kill_and_resume_repeats_the_uninterrupted_trajectory(cache, one_worker_run, tmp_path) -> None:
    """SIGKILL the `cascade train-c` process group after its first checkpoint, rerun it: same losses, same weights."""
    one_config, one = one_worker_run
    kill_and_resume("train-c", dataclasses.replace(one_config, output_dir=str(tmp_path)), one)


def test_a_killed_train_worker_restarts_from_its_checkpoint(cache, one_worker_run, tmp_path) -> None:
    """SIGKILL the Ray Train worker after its first checkpoint: FailureConfig restarts the worker group, which
    resumes from that checkpoint, finishes, and repeats the uninterrupted run's losses and weights."""
    one_config, one = one_worker_run
    config = dataclasses.replace(one_config, output_dir=str(tmp_path),
                                 scaling=dataclasses.replace(HALF_CPU, max_failures=1))  # fmt: skip
    run_dir, killed = tmp_path / "stage_c", {}

    def kill_worker_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("checkpoint_*/trainer_state.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed["checkpoints"] = sorted(p.parent.name for p in run_dir.glob("checkpoint_*/trainer_state.json"))
        killed["pids"] = _train_worker_pids()
        for pid in killed["pids"]:
            os.kill(pid, signal.SIGKILL)

    watcher = threading.Thread(target=kill_worker_after_first_checkpoint, daemon=True)
    watcher.start()
    summary = run_train(config)
    watcher.join(timeout=60)
    assert len(killed["pids"]) == 1 and killed["checkpoints"][0] in (
        "checkpoint_00000004",
        "checkpoint_00000008",
    )
    assert "checkpoint_00000016" not in killed["checkpoints"], "the run finished before its worker was killed"
    assert summary.final_step == 16
    for pid in killed["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    losses = [r["loss"] for r in metrics(summary)]
    np.testing.assert_allclose(losses, [r["loss"] for r in metrics(one)], rtol=1e-6, atol=1e-7)
    w_restarted, _, _ = read_checkpoint(summary.checkpoint)
    w_ref, _, _ = read_checkpoint(one.checkpoint)
    assert all(
        torch.allclose(w_restarted["generator"][k], v, atol=1e-6) for k, v in w_ref["generator"].items()
    )


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def _train_worker_pids() -> list[int]:
    """This test process's Ray Train workers: descendants titled ``ray::RayTrainWorker...`` (the session's
    raylet was started by this process; other Ray instances on the machine are left alone)."""
    pids = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                continue
            ancestor = pid
            while ancestor > 1 and ancestor != os.getpid():
                ancestor = _parent(ancestor)
        except (OSError, StopIteration):
            continue
        if ancestor == os.getpid():
            pids.append(pid)
    return pids


@pytest.fixture(scope="module")
def trained_generator(one_worker_run) -> str:
    """A Stage C with a trained output layer (the official init zeroes it: adapters get no gradient before)."""
    return str(Path(one_worker_run[1].checkpoint) / "generator.safetensors")


def test_lora_trains_on_a_frozen_stage_c_and_round_trips(cache, trained_generator, tmp_path) -> None:
    from stages.lora import build_lora, load_lora, merge_lora

    summary = run_train(_config(cache, tmp_path, mode="lora", lr=1e-2, weights=trained_generator))
    checkpoint = Path(summary.checkpoint)
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [
        "lora.safetensors",
        "optimizer.safetensors",
    ]
    base, _ = build_model("stage_c/tiny", weights=trained_generator)
    fresh = build_model("stage_c/tiny", weights=trained_generator)[0]
    bundle = build_lora(fresh, rank=4)
    load_lora(bundle, checkpoint / "lora.safetensors")
    assert any(p.abs().sum() > 0 for n, p in bundle.named_parameters() if "lora_down" in n), "LoRA trained"
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 16, 8, 8, generator=gen), torch.rand(2, generator=gen),
              torch.randn(2, 77, 32, generator=gen), torch.randn(2, 1, 32, generator=gen), torch.zeros(2, 1, 32))  # fmt: skip
    with torch.no_grad():
        with_lora = fresh(*inputs)
        merged = merge_lora(fresh)(*inputs)
        plain = base(*inputs)
    assert torch.allclose(with_lora, merged, atol=1e-5)
    assert not torch.allclose(with_lora, plain, atol=1e-4)
    assert set(fresh.state_dict()) == set(base.state_dict()), "merged: the official keys again"


@pytest.mark.parametrize(
    "kind",  # inpainting by default; the other two controls (20 s each) with -m slow
    [
        pytest.param("canny", marks=pytest.mark.slow),
        "inpainting",
        pytest.param("super_resolution", marks=pytest.mark.slow),
    ],
)
def test_controlnet_trains_only_its_parameters(cache, trained_generator, tmp_path, kind) -> None:
    from stages.weights import read_safetensors

    cn = ControlNetTrainConfig(flavor=f"controlnet/{kind}/tiny", effnet="effnet/tiny")
    config = _config(
        cache, tmp_path, mode="controlnet", controlnet=cn, max_steps=2, lr=1e-2, weights=trained_generator
    )
    summary = run_train(config)
    checkpoint = Path(summary.checkpoint)
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [
        "controlnet.safetensors",
        "optimizer.safetensors",
    ]
    initial, _ = build_model(cn.flavor)
    trained, _ = build_model(cn.flavor, weights=str(checkpoint / "controlnet.safetensors"))  # strict load
    state = read_safetensors(checkpoint / "controlnet.safetensors").state_dict
    assert set(state) == set(initial.state_dict())
    changed = [
        k for k, v in initial.state_dict().items() if v.is_floating_point() and not torch.equal(v, state[k])
    ]
    assert any(k.startswith("projections.") for k in changed), "the zero-init projections moved"
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in state.items()), "reloads exactly"


def test_bad_configs_fail_before_any_worker_with_the_field_named(cache, tmp_path) -> None:
    def fails(match: str, **overrides) -> None:
        started = time.perf_counter()
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            run_train(_config(cache, tmp_path, **overrides))
        assert time.perf_counter() - started < 5, "failed late"
        assert not (tmp_path / "stage_c").exists(), "a run started"

    fails(r"flavor: unknown flavor 'stage_c/2b'", flavor="stage_c/2b")
    fails(r"data.path: no \*.parquet latent files", data=TrainDataConfig(path=str(tmp_path / "nothing")))
    fails(r"flavor='stage_c/1b' expects clip_text of shape \(77, 1280\)", flavor="stage_c/1b")
    fails(r"weights='/no/such.safetensors' does not exist", weights="/no/such.safetensors")
    fails(r"controlnet.flavor='controlnet/canny' \(c_proj 2048", mode="controlnet",
          controlnet=ControlNetTrainConfig(flavor="controlnet/canny"))  # fmt: skip
    fails(r"weights is required for flavor='stage_c/1b' \(only \*/tiny flavors run on random weights\)",
          mode="lora", flavor="stage_c/1b")  # a frozen released Stage C needs its weights  # fmt: skip
    fails(r"was encoded with random-weight encoders \(clip_image=clip_vision/tiny, clip_text=clip_text/tiny, "
          r"effnet=effnet/tiny\).*set allow_random_weights: true", allow_random_weights=False)  # fmt: skip
    fails(r"batch_size=8 exceeds", batch_size=8)
    with pytest.raises(ValueError, match=r"batch_size=3 must be a multiple of .* = 2"):
        _config(cache, tmp_path, batch_size=3, grad_accum_steps=2)


def test_fsdp_shards_the_generator_and_saves_the_full_official_state(cache, one_worker_run, tmp_path) -> None:
    """FSDP (fully_shard, bf16 parameters) on 2 CPU workers: the same losses as DDP within bf16 rounding."""
    one_config, one = one_worker_run
    config = dataclasses.replace(one_config, output_dir=str(tmp_path), max_steps=2, save_every=2, grad_accum_steps=1,
                                 scaling=dataclasses.replace(HALF_CPU, num_workers=2, strategy="fsdp"))  # fmt: skip
    summary = run_train(config)
    losses = [r["loss"] for r in metrics(summary)]
    np.testing.assert_allclose(losses, [r["loss"] for r in metrics(one)][:2], rtol=2e-2)
    model, _ = build_model("stage_c/tiny", weights=str(Path(summary.checkpoint) / "generator.safetensors"))
    weights, optimizer, state = read_checkpoint(summary.checkpoint)
    assert state["world_size"] == 2 and set(weights["generator"]) == set(model.state_dict())
    assert set(optimizer["state"]) == {k for k, _ in model.named_parameters()}


@pytest.mark.slow  # 59 s; by default a killed worker resumes from its local checkpoint, and S3 by export's and the latents reader's loopback tests
def test_checkpoints_on_s3_and_resume_from_there(cache, tmp_path) -> None:
    """Ray Train storage on the S3 protocol (moto on loopback): checkpoints, metrics and resume go through it."""
    import fsspec

    with moto_endpoint() as endpoint:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("train-s3-test")
        config = _config(cache, tmp_path, output_dir="s3://train-s3-test/runs", storage_endpoint_url=endpoint,
                         max_steps=2, save_every=2)  # fmt: skip
        first = run_train(config)
        assert first.checkpoint.endswith("train-s3-test/runs/stage_c/checkpoint_00000002")
        names = {p.rsplit("/", 1)[-1] for p in fs.ls("train-s3-test/runs/stage_c/checkpoint_00000002")}
        assert {"generator.safetensors", "optimizer.safetensors", "trainer_state.json"} <= names
        second = run_train(dataclasses.replace(config, max_steps=4))
        assert (second.start_step, second.final_step) == (2, 4)
        rows = list(csv.DictReader(fs.open("train-s3-test/runs/stage_c/metrics.csv", "r")))
        assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]


def test_webdataset_cache_gives_the_parquet_micro_batches(cache) -> None:
    parquet = _config(cache, Path("unused"))
    tars = dataclasses.replace(parquet, data=dataclasses.replace(parquet.data, format="webdataset"))
    batches = []
    for config in (parquet, tars):
        plan = check_train(config)
        batches.append([b for w in plan.windows for b in window_micro_batches(w, read_spec(config, plan))])
    assert len(batches[0]) == len(batches[1]) == 6
    for a, b in zip(*batches, strict=True):
        assert a["key"] == b["key"] and all(
            np.array_equal(a[k], b[k]) for k in ("effnet", "clip_text", "clip_img")
        )


def test_warmup_and_ema_follow_the_official_schedule(cache, tmp_path) -> None:
    """In-process (no Ray): lr ramps as GradualWarmupScheduler(multiplier=1); EMA copies, then blends."""
    from jobs.train_loop import TrainLoop, World

    config = _config(cache, tmp_path, max_steps=6, save_every=6, warmup_updates=4, lr=1e-3,
                     ema=EmaConfig(start_step=2, every=1, beta=0.5))  # fmt: skip
    plan = check_train(config)
    loop = TrainLoop(config, World(), plan.cache.empty_caption, plan.columns)
    batches = (b for w in plan.windows for b in window_micro_batches(w, read_spec(config, plan)))
    seen = []  # (step, lr for the next update) after every update; the first update runs at lr 0
    original = loop._update_ema

    def spy() -> None:
        before = {k: v.clone() for k, v in loop.ema.state_dict().items()}
        seen.append((loop.step, loop.optimizer.param_groups[0]["lr"]))
        original()
        after, now = loop.ema.state_dict(), loop.module.state_dict()
        beta = 0.5 if loop.step > 2 else 0.0
        for k, v in after.items():
            if v.is_floating_point():
                torch.testing.assert_close(v, before[k] * beta + now[k] * (1 - beta))

    loop._update_ema = spy
    rows = loop.run(batches, progress=False)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [lr for _, lr in seen] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert rows[-1]["step"] == 6
