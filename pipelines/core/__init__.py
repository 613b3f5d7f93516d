"""The shared core of every pipeline: steps and plans, commits, sinks, shard and latent I/O, images, validation."""
