"""Components every part shares: loading and checking pipelines, the batched UNet core, attention recording,
the work shared by the processes of `accelerate launch`."""
