"""Measuring against the training set: replication metrics, metrics, image features and embedders, and a
nearest-neighbour index of the training images."""
