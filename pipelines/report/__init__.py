"""``cascade report``: Stage B + A reconstruction quality of a cache or of raw images, JSON + HTML."""
