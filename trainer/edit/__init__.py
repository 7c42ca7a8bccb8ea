"""Checkpoint edits that remove memorized content from a released Stable Diffusion model."""
