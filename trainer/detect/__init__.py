"""Memorization detectors and tests that probe a checkpoint for memorized content."""
