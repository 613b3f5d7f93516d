"""The training data plan: bucket-pure, deterministic, split the same for any (workers × accumulation)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.train_data.batches import CacheFile, epoch_windows, plan_windows, window_batches

FILES = tuple(
    CacheFile(f"f{i}.parquet", bucket, rows)
    for i, (bucket, rows) in enumerate([("24x24", 7), ("28x20", 5), ("24x24", 9), ("20x28", 3), ("28x20", 6)])
)


def _rows(plan, batch: np.ndarray) -> list[tuple[str, int]]:
    return [(FILES[plan.files[i]].uri, int(r)) for i, r in batch]


def _all_batches(seed: int = 0, global_batch: int = 4, max_steps: int = 20, window: int = 2, start: int = 0):
    plans = plan_windows(
        FILES,
        seed=seed,
        global_batch=global_batch,
        max_steps=max_steps,
        window_files=window,
        start_step=start,
    )
    out = []
    for p in plans:
        batches = window_batches(
            [FILES[i].bucket for i in p.files], [FILES[i].num_rows for i in p.files],
            seed=seed, epoch=p.epoch, window=p.window, global_batch=global_batch,
        )  # fmt: skip
        assert len(batches) == p.n_steps
        out += [(p.first_step + k, p, b) for k, b in enumerate(batches)]
    return [x for x in out if start <= x[0] < max_steps]


def test_every_batch_is_one_bucket_and_epochs_use_rows_once() -> None:
    batches = _all_batches(window=5)
    assert [s for s, *_ in batches] == list(range(20))
    epoch0 = [(p, b) for _, p, b in batches if p.epoch == 0]
    seen = set()
    for plan, batch in epoch0:
        assert len({FILES[plan.files[i]].bucket for i, _ in batch}) == 1
        rows = _rows(plan, batch)
        assert not seen & set(rows), "a row appears twice in one epoch"
        seen |= set(rows)
    # with one window per epoch, each bucket leaves out its remainder only: 16 // 4 + 11 // 4 + 3 // 4 = 6 batches
    assert len(epoch0) == 6 and len(seen) == 24


def test_the_order_is_a_function_of_the_seed() -> None:
    first, again, other = _all_batches(seed=1), _all_batches(seed=1), _all_batches(seed=2)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a[2], b[2]) for a, b in zip(first, other, strict=False))
    assert epoch_windows(5, 1, 0, 2) != epoch_windows(5, 1, 1, 2), "epochs reshuffle the files"


def test_resume_plans_the_same_steps() -> None:
    full = {s: (p.epoch, p.window, b) for s, p, b in _all_batches()}
    resumed = _all_batches(start=9)
    assert [s for s, *_ in resumed] == list(range(9, 20))
    for step, plan, batch in resumed:
        epoch, window, expected = full[step]
        assert (plan.epoch, plan.window) == (epoch, window) and np.array_equal(batch, expected)


def test_a_batch_larger_than_every_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size=32 exceeds"):
        plan_windows(FILES, seed=0, global_batch=32, max_steps=5, window_files=8)
