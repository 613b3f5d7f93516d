"""``cascade app``: the Gradio web app (``jobs.app.main``), one module per tab."""
