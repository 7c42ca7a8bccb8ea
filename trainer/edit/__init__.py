"""Checkpoint edits that remove memorized content from a loaded Stable Diffusion pipeline, in memory."""
