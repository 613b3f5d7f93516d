"""Runs after test_submit.py (file order): its head is gone, and the session's local Ray still starts."""

from __future__ import annotations

from tests.cluster.ray_head import marked_pids


def test_no_head_is_left_and_the_local_ray_still_starts(ray_local) -> None:
    assert marked_pids(None) == []  # every process of every submission-test head was stopped

    @ray_local.remote
    def square(x: int) -> int:
        return x * x

    assert ray_local.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
