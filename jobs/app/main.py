"""``cascade app``: a Gradio app over a project's outputs, on 127.0.0.1 by default, never shared publicly.

Tabs: **Explore** (scores and dedup: histograms, filter-rule sliders with live counts, samples either side of
the threshold, the rules as a filter YAML), **Cache** (a latent cache by bucket and shard: Previewer decodes
beside the original crops), **Sample** (``cascade sample``'s modes and defaults) and **Reports** (``cascade
report`` outputs). ``cascade app DIR`` finds the outputs under DIR by their manifests (the demo's folder works
as is); ``--scores``/``--dedup``/``--latents``/``--reports`` name them directly.

Models: ``--weights DIR`` (the released files under their official names) or ``--tiny`` (the ``*/tiny``
flavors, seeded random weights: tests and demos); without either, the Cache decode and the Sample tab say how to
start with weights. Gradio is an optional extra (``pip install -e '.[app]'``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from jobs.app.common import CSS, AppState

DEFAULT_PORT = 7860


def discover(root: str) -> dict[str, str]:
    """The outputs directly under ``root`` (or ``root`` itself), by their manifests' schema."""
    from pipelines.core.commits import read_manifest

    found: dict[str, str] = {}
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    for folder in [base, *sorted(p for p in base.iterdir() if p.is_dir())]:
        schema = str((read_manifest(str(folder)) or {}).get("schema", ""))
        kind = ("scores" if schema.startswith("scores@") else "dedup" if schema.startswith("dedup@")
                else "latents" if schema.startswith("latents@") else None)  # fmt: skip
        if kind and kind not in found:
            found[kind] = str(folder)
    return found


def state_from_args(args: argparse.Namespace) -> AppState:
    """The app's state from ``cascade app``'s options (FileNotFoundError / ValueError name the option)."""
    if args.weights and args.tiny:
        raise ValueError("--weights and --tiny exclude each other: released weights, or random test weights")
    if args.weights and not Path(args.weights).expanduser().is_dir():
        raise FileNotFoundError(f"--weights {args.weights}: no such folder")
    found = discover(args.root) if args.root else {}
    for option in ("scores", "dedup", "latents"):
        value = getattr(args, option)
        if value and not Path(value).expanduser().exists() and "://" not in value:
            raise FileNotFoundError(f"--{option} {value}: no such folder")
    reports = list(args.reports or ([args.root] if args.root else []))
    for folder in reports:
        if not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"--reports {folder}: no such folder")
    return AppState(root=args.root, scores_dir=args.scores or found.get("scores"),
                    dedup_dir=args.dedup or found.get("dedup"), latents_dir=args.latents or found.get("latents"),
                    report_roots=reports, weights=args.weights, tiny=args.tiny, device=args.device)  # fmt: skip


def build_app(state: AppState) -> Any:
    """The Gradio Blocks of the four tabs."""
    import gradio as gr

    from jobs.app import cache, explore, reports, sample

    with gr.Blocks(title="cascade-data") as app:
        gr.Markdown("## cascade-data")
        if state.random_weights:
            gr.HTML('<div class="cascade-warn" id="random-banner"><b>Random weights (--tiny).</b> Decodes and '
                    "samples come from seeded random weights: they show the plumbing, not Stable Cascade.</div>")  # fmt: skip
        # Explore fills on page load; the other tabs when first opened, so the first paint waits for Explore only
        for title, module in (
            ("Explore", explore),
            ("Cache", cache),
            ("Sample", sample),
            ("Reports", reports),
        ):
            with gr.Tab(title, id=title.lower()) as tab:
                shown = module.build(state)
            if shown is not None:
                fn, inputs, outputs = shown
                event = app.load if module is explore else tab.select
                event(fn, inputs, outputs, queue=False, show_progress="hidden")  # no queue round trip
    return app


def launch(state: AppState, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, block: bool = True) -> Any:
    """Serve the app on ``host:port`` (no public share link, no analytics); returns the Blocks."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(state)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               allowed_paths=state.allowed_paths, css=CSS, show_error=False, footer_links=[])  # fmt: skip
    return app


def cmd_app(args: argparse.Namespace) -> int:
    state = state_from_args(args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("cascade app needs the app extra: pip install -e '.[app]'") from None
    print(f"cascade app: http://{args.host}:{args.port}/  (Ctrl-C stops it)", flush=True)
    launch(state, host=args.host, port=args.port)
    return 0


def add_app_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="a web app over the outputs: explore scores, browse the cache, sample, reports",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("root", nargs="?", help="a folder of outputs (e.g. the demo's), found by their manifests")
    p.add_argument("--scores", help="a cascade score output")
    p.add_argument("--dedup", help="a cascade dedup output of those scores")
    p.add_argument("--latents", help="a cascade encode output")
    p.add_argument("--reports", action="append", help="a folder holding cascade report outputs (repeatable)")
    p.add_argument("--weights", help="a folder with the released weights under their official file names")
    p.add_argument(
        "--tiny", action="store_true", help="the */tiny flavors with seeded random weights (tests, demos)"
    )
    p.add_argument("--device", default="cpu", help="torch device for decodes and sampling")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.set_defaults(func=cmd_app)
