"""Diffusion: noise schedules, the training loss, the latent autoencoder."""
