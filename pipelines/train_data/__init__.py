"""Training batches from a latent cache, and the training crops that ControlNet inputs are made from."""
