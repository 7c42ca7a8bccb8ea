"""One thin module per `memtrain` verb: argparse wiring over the library functions."""
