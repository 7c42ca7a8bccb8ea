"""Training-time mitigations: caption randomization and embedding noise, de-duplication, loss masking, presets."""
