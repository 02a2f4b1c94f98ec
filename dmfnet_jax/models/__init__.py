"""Flax models of DM-FNet: the Stage I diffusion UNet and the Stage II fusion head."""
