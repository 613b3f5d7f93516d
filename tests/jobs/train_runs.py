"""Shared checks of the training tests: a SIGKILLed CLI run that resumes, and a checkpoint that loads strictly
into ``stages`` and into diffusers' ``StableCascadeUNet``."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from jobs.train import latest_checkpoint, run_train
from jobs.train_checkpoint import read_checkpoint
from jobs.train_config import TrainConfig
from stages.flavors import build_model
from tests.conftest import REPO_ROOT
from tests.processes import kill_marked_processes


def metrics(summary_or_dir) -> list[dict[str, float]]:
    path = Path(getattr(summary_or_dir, "metrics_csv", summary_or_dir))
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(path.open())]


def kill_and_resume(command: str, config: TrainConfig, reference) -> None:
    """Run ``cascade <command>`` on ``config``, SIGKILL its process group after its first checkpoint, rerun
    it: it resumes there and repeats ``reference``'s (the uninterrupted run's summary) losses and weights."""
    out = Path(config.output_dir)
    (out / "train.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config)))))
    argv = [sys.executable, "-m", "jobs.cli", command, "--config", str(out / "train.yaml")]
    ray_tmp = tempfile.mkdtemp(prefix="raykill", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env | {"RAY_TMPDIR": ray_tmp}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 240
    while latest_checkpoint(config)[1] is None:  # the first complete checkpoint
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_marked_processes(f"RAY_TMPDIR={ray_tmp}")  # its Ray: raylet and workers run in sessions of their own
    killed_at = latest_checkpoint(config)[1]["step"]  # a checkpoint cut by the kill is passed over
    assert killed_at < config.max_steps, "the run finished before it was killed"
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{") :])["start_step"] == killed_at
    resumed = [r["loss"] for r in metrics(Path(config.run_dir) / "metrics.csv")]
    np.testing.assert_allclose(resumed, [r["loss"] for r in metrics(reference)], rtol=1e-6, atol=1e-7)
    w_resumed, _, _ = read_checkpoint(Path(config.run_dir) / f"checkpoint_{config.max_steps:08d}")
    w_ref, _, _ = read_checkpoint(reference.checkpoint)
    assert all(torch.allclose(w_resumed["generator"][k], v, atol=1e-6) for k, v in w_ref["generator"].items())


def two_workers_match(one_config: TrainConfig, one, out: Path) -> tuple[dict, dict]:
    """Rerun ``one_config`` (1 worker, accumulation 2) on 2 workers with accumulation 1 into ``out``: the same
    losses (rtol 1e-5) and generator weights (1e-5) as ``one`` (its summary); returns both trainer states."""
    two = run_train(dataclasses.replace(
        one_config, output_dir=str(out), grad_accum_steps=1,
        scaling=dataclasses.replace(one_config.scaling, num_workers=2),
    ))  # fmt: skip
    losses_one, losses_two = [r["loss"] for r in metrics(one)], [r["loss"] for r in metrics(two)]
    assert len(losses_one) == len(losses_two) == one_config.max_steps
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5, atol=1e-6)
    w1, _, s1 = read_checkpoint(one.checkpoint)
    w2, _, s2 = read_checkpoint(two.checkpoint)
    diff = max((w1["generator"][k] - w2["generator"][k]).abs().max().item() for k in w1["generator"])
    assert diff <= 1e-5, f"weights differ by {diff}"
    return s1, s2


def loads_strictly_and_into_diffusers(path: Path, flavor: str, inputs: dict[str, torch.Tensor]) -> None:
    """The checkpoint file loads strictly into ``flavor`` and, renamed, into diffusers' ``StableCascadeUNet``;
    both give the same output for ``inputs`` (ours: positional ``x, r, *conditions``; diffusers: keywords)."""
    from diffusers import StableCascadeUNet

    from stages.diffusers_keys import diffusers_config, official_to_diffusers
    from stages.weights import read_safetensors

    model, sha = build_model(flavor, weights=str(path))
    assert sha is not None
    reference = StableCascadeUNet(**diffusers_config(model.config)).eval()
    reference.load_state_dict(official_to_diffusers(read_safetensors(path).state_dict), strict=True)
    with torch.no_grad():
        ours = model(*inputs.values())
        theirs = reference(**inputs).sample
    assert (ours - theirs).abs().max() <= 1e-5
