"""Edits of released checkpoints that remove memorized content: subspace deletion (`prune`), neuron
blocking (`neurons`), LoRA unlearning (`unlearn`) and the closed-form cross-attention edit (`uce`)."""
