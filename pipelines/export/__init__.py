"""``cascade export``: a latent cache as Parquet for third-party readers."""
