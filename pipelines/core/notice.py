"""What a job tells its user while it runs: one line on stderr (the summary JSON owns stdout)."""

from __future__ import annotations

import sys


def notice(text: str) -> None:
    print(f"cascade: {text}", file=sys.stderr, flush=True)
