"""The Sample tab: ``cascade sample``'s modes, models and notebook defaults (``jobs.sample``'s library API), the
images with every setting, and the random-weights banner when the models are random."""

from __future__ import annotations

import base64
import io
import json
from html import escape
from typing import Any

from jobs.app.common import AppState, banner, message_html
from stages import sampling

NO_CONTROL = "(none)"


def source_of(state: AppState, checkpoints: str) -> Any:
    """The models the app was started with (``--weights`` or ``--tiny``), plus any checkpoint folders."""
    from jobs.sample_models import ModelSource

    if state.weights is None and not state.tiny:
        raise ValueError("start the app with --weights DIR (the released files) to sample; --tiny for random "
                         "test weights")  # fmt: skip
    paths = tuple(p.strip() for p in checkpoints.split(",") if p.strip())
    return ModelSource(weights=state.weights, checkpoints=paths, flavors="tiny" if state.tiny else "released",
                       device=state.device)  # fmt: skip


def _file(value: Any) -> str | None:
    """A gr.File value as a path (Gradio gives a path, or an object with ``.name``)."""
    if value is None:
        return None
    return value if isinstance(value, str) else getattr(value, "name", None)


def sample_html(state: AppState, checkpoints: str, mode: str, control: str, prompt: str, image: Any, mask: Any,
                seed: float, batch: float, height: float, width: float, c_steps: float, b_steps: float,
                strength: float) -> str:  # fmt: skip
    """Run one request; the images and settings, or a one-line message for any mistake."""
    from jobs.sample import SampleRequest, run_sample
    from jobs.sample_models import load_models, random_banner

    try:
        request = SampleRequest(
            mode=mode, prompt=prompt if mode != "image-variation" else "", image=_file(image), mask=_file(mask),
            control=None if control in (None, "", NO_CONTROL) else control, seed=int(seed), batch=int(batch),
            height=int(height), width=int(width), c_steps=int(c_steps), b_steps=int(b_steps), strength=float(strength),
        )  # fmt: skip
        images, settings = run_sample(load_models(source_of(state, checkpoints)), request)
    except (ValueError, OSError) as err:
        return message_html(str(err))
    warn = random_banner(settings.get("random_models") or [])
    figures = "".join(f'<figure><img src="{_png_uri(im)}" alt="sample {i}"><figcaption>seed {request.seed}, '
                      f"#{i}</figcaption></figure>" for i, im in enumerate(images))  # fmt: skip
    shown = json.dumps(settings, indent=1)
    return (f"{banner(warn) if warn else ''}<div class='grid'>{figures}</div>"
            f"<details><summary>every setting</summary><pre>{escape(shown)}</pre></details>")  # fmt: skip


def _png_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def build(state: AppState) -> None:
    import gradio as gr

    from jobs.sample import MODES
    from stages.control_inputs import CONTROL_KINDS

    with gr.Row():
        mode = gr.Dropdown(label="mode", choices=list(MODES), value=MODES[0], elem_id="sample-mode")
        control = gr.Dropdown(label="ControlNet", choices=[NO_CONTROL, *CONTROL_KINDS], value=NO_CONTROL,
                              elem_id="sample-control")  # fmt: skip
        checkpoints = gr.Textbox(
            label="checkpoint folder(s), comma-separated (optional)", elem_id="sample-ckpt"
        )
    prompt = gr.Textbox(label="prompt", elem_id="sample-prompt")
    with gr.Row():
        image = gr.File(label="input image (every mode but text-to-image)", elem_id="sample-image")
        mask = gr.File(label="inpainting mask (optional: the centre)", elem_id="sample-mask")
    with gr.Row():
        seed = gr.Number(label="seed", value=42, precision=0, elem_id="sample-seed")
        batch = gr.Number(label="batch", value=1, precision=0, minimum=1, elem_id="sample-batch")
        height = gr.Number(label="height", value=1024, precision=0, elem_id="sample-height")
        width = gr.Number(label="width", value=1024, precision=0, elem_id="sample-width")
    with gr.Row():
        c_steps = gr.Number(label="Stage C steps", value=sampling.STAGE_C.timesteps, precision=0,
                            elem_id="sample-c-steps")  # fmt: skip
        b_steps = gr.Number(label="Stage B steps", value=sampling.STAGE_B.timesteps, precision=0,
                            elem_id="sample-b-steps")  # fmt: skip
        strength = gr.Number(label="image-to-image strength", value=0.8, elem_id="sample-strength")
    gr.Markdown(f"Stage C cfg {sampling.STAGE_C.cfg:g}, shift {sampling.STAGE_C.shift:g}; Stage B cfg "
                f"{sampling.STAGE_B.cfg:g}, shift {sampling.STAGE_B.shift:g} (the official notebooks').")  # fmt: skip
    run = gr.Button("Sample", variant="primary", elem_id="sample-run")
    output = gr.HTML(elem_id="sample-output")
    inputs = [
        checkpoints,
        mode,
        control,
        prompt,
        image,
        mask,
        seed,
        batch,
        height,
        width,
        c_steps,
        b_steps,
        strength,
    ]
    run.click(lambda *values: sample_html(state, *values), inputs, output)
