"""The toy world: procedural data with planted duplicates, a tiny SD-shaped base model, a text-alignment
checker, and the end-to-end demo and comparison. Production modules never import it; importing it
registers its quality feature (palette KID features and toy alignment) for toy captions."""

from trainer.measure.features import register_quality_feature
from trainer.toy.checker import TOY_QUALITY

register_quality_feature(TOY_QUALITY)
