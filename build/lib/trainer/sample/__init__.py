"""Guarded sampling: generation that steers away from replicating training images (AMG, Wen et al.)."""
