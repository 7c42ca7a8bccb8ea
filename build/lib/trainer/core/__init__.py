"""Components every part shares: loading and checking checkpoints, the batched UNet core, training checkpoints."""
