"""The toy world: procedural data with planted duplicates, a tiny SD-shaped base model, a text-alignment
checker, and the end-to-end demo and comparison. Production modules never import it; its quality feature
(palette KID features and toy alignment, `checker.TOY_QUALITY`) is chosen explicitly: `quality_feature=` in
Python, `--quality-feature toy` on the command line (`trainer.cli` names it)."""
