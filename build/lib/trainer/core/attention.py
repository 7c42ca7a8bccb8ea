"""Cross-attention (attn2) modules of a UNet: find them in forward order, and record their softmax attention
with a diffusers attention processor (Ren et al., ECCV 2024, use it for their entropy detector)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from trainer.io import MemtrainError


def cross_attention_modules(unet) -> list[str]:
    """Names of the cross-attention (attn2) modules in FORWARD order: down blocks, mid block, up blocks."""
    section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def key(name: str):
        parts = name.split(".")
        return (section.get(parts[0], 3), [int(p) if p.isdigit() else -1 for p in parts[1:]])

    names = [
        n
        for n, m in unet.named_modules()
        if getattr(m, "is_cross_attention", False) and hasattr(m, "processor")
    ]
    return sorted(names, key=key)


def resolve_cross_attention(unet, layer: str | int, default: str | None = None) -> list[str]:
    """The attn2 module names of `layer`: an index into `cross_attention_modules`, or a module-name prefix.

    When `layer == default` and no module matches it (small models), the fallback is the 4th
    cross-attention layer in forward order, or the last one when there are fewer than 4.
    """
    names = cross_attention_modules(unet)
    if not names:
        raise MemtrainError("the UNet has no cross-attention (attn2) modules")
    if isinstance(layer, int):
        if not -len(names) <= layer < len(names):
            raise MemtrainError(
                f"cross-attention layer index {layer} out of range: the UNet has {len(names)}"
            )
        return [names[layer]]
    chosen = [n for n in names if n == layer or n.startswith(layer + ".")]
    if chosen:
        return chosen
    if layer == default:
        return [names[3] if len(names) >= 4 else names[-1]]
    raise MemtrainError(f"no cross-attention module named {layer!r}; available: {', '.join(names)}")


class _RecordingProcessor:
    """diffusers' plain `AttnProcessor` math, plus: store the softmax averaged over heads and queries."""

    def __init__(self, store: list[torch.Tensor]):
        self.store = store

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B * heads, queries, tokens]
        self.store.append(probs.detach().float().view(batch, attn.heads, *probs.shape[1:]).mean(dim=(1, 2)))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def record_cross_attention(unet, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the attention of the named attn2 modules; yields {name: [per-forward [B, tokens] tensors]}.

    Each tensor is the softmax attention averaged over heads and query pixels (one distribution
    over the text tokens per sample). Only the named modules get the recording processor; their
    original processors are restored on exit, also on error.
    """
    modules = dict(unet.named_modules())
    records: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    saved = {}
    try:
        for name in names:
            saved[name] = modules[name].processor
            modules[name].set_processor(_RecordingProcessor(records[name]))
        yield records
    finally:
        for name, processor in saved.items():
            modules[name].set_processor(processor)


def stack_records(records: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """[modules, samples, tokens] from `record_cross_attention`'s records (forward order of samples)."""
    return torch.stack([torch.cat(chunks) for chunks in records.values()])
