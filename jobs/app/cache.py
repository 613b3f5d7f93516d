"""The Cache tab: a latent cache by bucket and shard file, each row's key, caption and crop box, the Previewer
decode of its effnet latent, and the original crop from the source shard beside it."""

from __future__ import annotations

from functools import cache
from html import escape
from typing import Any

import numpy as np
import torch
from PIL import Image

from jobs.app.common import AppState, banner, message_html
from jobs.specs.preview import decoded
from pipelines.core.lookup import jpeg_data_uri
from pipelines.explore.cache import CacheView
from schemas import columns as c

PER_PAGE = 8
DECODE_PX = 192


@cache
def previewer(weights: str | None, device: str) -> torch.nn.Module:
    """The released Previewer from ``weights`` (official file name), or ``previewer/tiny`` when None."""
    from stages.flavors import build_model, find_weights, get_flavor

    if weights is None:
        return build_model("previewer/tiny", device=device)[0]
    flavor = get_flavor("previewer")
    return build_model("previewer", weights=find_weights(flavor, weights), device=device)[0]


def decode_images(state: AppState, latents: np.ndarray) -> list[Image.Image] | str:
    """Previewer decodes of effnet latents (N, 16, h, w), or why there are none."""
    if state.weights is None and not state.tiny:
        return "Start the app with --weights DIR (the released previewer.safetensors) to decode latents."
    model = previewer(state.weights, state.device)
    if model.config.c_in != latents.shape[1]:
        return f"the Previewer takes {model.config.c_in} channels; these latents have {latents.shape[1]}"
    with torch.no_grad():
        images = decoded(
            model(torch.from_numpy(latents).to(state.device)), real_weights=state.weights is not None
        )
    out = []
    for image in images.cpu():
        array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(array)
        out.append(
            pil.resize((DECODE_PX, round(DECODE_PX * pil.height / pil.width)), Image.Resampling.NEAREST)
        )
    return out


def rows_html(state: AppState, view: CacheView, file: str, page: int) -> str:
    rows, latents = view.rows(file, page, PER_PAGE)
    if not rows:
        return "<p>No rows on this page.</p>"
    decodes = decode_images(state, latents)
    crops = view.original_crops(rows, DECODE_PX)
    note = message_html(decodes) if isinstance(decodes, str) else ""
    parts = [note]
    for i, row in enumerate(rows):
        key = row[c.KEY]
        decode = (f'<figure><img class="decode" src="{jpeg_data_uri(decodes[i])}" alt="decode {escape(key)}">'
                  "<figcaption>Previewer decode</figcaption></figure>") if not isinstance(decodes, str) else ""  # fmt: skip
        crop = (f'<figure><img class="crop" src="{jpeg_data_uri(crops[key])}" alt="crop {escape(key)}">'
                "<figcaption>original crop</figcaption></figure>") if key in crops \
            else '<div class="missing">source image not found</div>'  # fmt: skip
        box = ", ".join(str(row.get(k)) for k in (c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM))
        meta = (f"<div><b>{escape(key)}</b><br>{escape(str(row.get(c.CAPTION) or ''))[:200]}<br><small>bucket "
                f"{escape(str(row.get(c.BUCKET)))} · crop box ({box}) of {row.get(c.ORIG_WIDTH)}×{row.get(c.ORIG_HEIGHT)}"
                f"<br>{escape(str(row.get(c.SOURCE_SHARD) or ''))}</small></div>")  # fmt: skip
        parts.append(f'<div class="pair">{decode}{crop}{meta}</div>')
    return "".join(parts)


def build(state: AppState) -> tuple[Any, list[Any], list[Any]]:
    import gradio as gr

    views: dict[str, CacheView] = {}

    def view_of(root: str) -> CacheView:
        if root.strip() not in views:
            views.clear()
            views[root.strip()] = CacheView.open(root.strip(), state.storage_options)
        return views[root.strip()]

    with gr.Row():
        root_box = gr.Textbox(
            label="latents_dir (a cascade encode output)", value=state.latents_dir or "", scale=4
        )
        open_button = gr.Button("Open", scale=1)
    info = gr.HTML(elem_id="cache-info")
    with gr.Row():
        bucket = gr.Dropdown(label="bucket", choices=[], elem_id="cache-bucket")
        file = gr.Dropdown(label="shard file", choices=[], elem_id="cache-file")
        page = gr.Number(label="page", value=0, minimum=0, precision=0)
    rows = gr.HTML(elem_id="cache-rows")

    def opened(root: str) -> list[Any]:
        try:
            view = view_of(root)
        except (OSError, ValueError) as err:
            return [
                message_html(str(err)),
                gr.update(choices=[], value=None),
                gr.update(choices=[], value=None),
                "",
            ]
        buckets = list(view.buckets)
        warn = banner("This cache was encoded with seeded random weights.") if view.random_weights else ""
        total = sum(n for files in view.buckets.values() for _, n in files)
        text = f"{warn}<p>{total:,} rows in {len(buckets)} bucket(s) · <code>{escape(view.root)}</code></p>"
        files = [f for f, _ in view.buckets[buckets[0]]] if buckets else []
        first = files[0] if files else None
        return [text, gr.update(choices=buckets, value=buckets[0] if buckets else None),
                gr.update(choices=files, value=first), rows_html(state, view, first, 0) if first else ""]  # fmt: skip

    def bucket_changed(root: str, name: str) -> Any:
        try:
            files = [f for f, _ in view_of(root).buckets.get(name, [])]
        except (OSError, ValueError):
            files = []
        return gr.update(choices=files, value=files[0] if files else None)

    def shown(root: str, name: str | None, page_number: float) -> str:
        if not name:
            return ""
        try:
            return rows_html(state, view_of(root), name, max(0, int(page_number or 0)))
        except (OSError, ValueError) as err:
            return message_html(str(err))

    outputs = [info, bucket, file, rows]
    open_button.click(opened, [root_box], outputs)
    bucket.input(bucket_changed, [root_box, bucket], file)
    file.input(shown, [root_box, file, page], rows)
    file.change(shown, [root_box, file, page], rows)
    page.change(shown, [root_box, file, page], rows)
    return opened, [root_box], outputs
