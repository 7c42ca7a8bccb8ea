"""Edits of released checkpoints that remove memorized content."""
