"""``cascade encode``: image–text shards into latent shards (effnet, Stage A, CLIP-bigG text, CLIP-L image)."""
