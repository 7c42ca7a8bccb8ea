"""Measuring against the training set: embeddings and a nearest-neighbour index of the training images."""
