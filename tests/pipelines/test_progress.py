"""The progress line a long job shows: plain lines off a terminal, a tqdm bar on one, counts and ETA."""

from __future__ import annotations

import io

from pipelines.core.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_interval_with_counts_rates_and_eta() -> None:
    out = io.StringIO()
    progress = Progress("encode", 4, stream=out, every_s=0)
    assert progress.mode == "plain"
    progress.update(1, samples=100, rejects=2)
    progress.update(1, samples=50, rejects=0)
    progress.close()  # nothing new since the last line: no repeat
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("encode: 1/4 shards, 100 samples (") and ", 2 rejects, " in lines[0]
    assert "/s)" in lines[0] and "ETA " in lines[0] and " elapsed" in lines[0]
    assert lines[1].startswith("encode: 2/4 shards, 150 samples (") and ", 2 rejects, " in lines[1]


def test_plain_lines_wait_for_the_interval_and_shown_values_replace() -> None:
    out = io.StringIO()
    with Progress("train-c", 100, unit="steps", rate_of="", stream=out, every_s=3600) as progress:
        progress.update(10, show={"loss": 0.51234, "samples/s": 12.5})
        progress.update(10, show={"loss": 0.4})
    (line,) = out.getvalue().splitlines()  # only the closing line: the interval never passed
    assert line.startswith("train-c: 20/100 steps, loss 0.4, samples/s 12.5, ") and "ETA" in line


def test_a_terminal_gets_a_bar_and_off_prints_nothing() -> None:
    tty = _Terminal()
    with Progress("score", 2, stream=tty) as progress:
        progress.update(2, samples=9, rejects=1)
    text = tty.getvalue()
    assert progress.mode == "bar" and "score" in text and "2/2" in text and "9 samples" in text
    quiet = io.StringIO()
    with Progress("score", 2, stream=quiet, mode="off") as progress:
        progress.update(2, samples=9)
    assert quiet.getvalue() == ""


def test_polling_reads_while_the_block_runs_and_once_after() -> None:
    import threading
    import time

    from pipelines.core.progress import polling

    calls: list[str] = []
    during = threading.Event()

    def read() -> None:
        calls.append(threading.current_thread().name)
        during.set()

    with polling(read, every_s=0.01):
        assert during.wait(5)  # the poller ran while the block was still running
        time.sleep(0.05)
    assert calls[-1] == threading.current_thread().name and "progress-poll" in calls


def test_a_resumed_job_counts_from_where_it_was_and_leaves_it_out_of_the_eta() -> None:
    out = io.StringIO()
    with Progress("train-b", 100, unit="steps", rate_of="", stream=out, every_s=3600, initial=90) as progress:
        assert progress.done == 90
        progress.update(5)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("train-b: 95/100 steps, ") and "ETA" in line
