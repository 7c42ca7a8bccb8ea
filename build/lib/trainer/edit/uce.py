"""Closed-form cross-attention edit of the key / value projections (`attn2.to_k`, `attn2.to_v`).

Implements UCE (Gandikota et al., WACV 2024, "Unified concept editing in diffusion models", equation 7
with erase scale 1): memorized prompts' tokens are mapped to their anchors' keys / values, preserved
prompts' kept; sums in float64. Deviation: all 77 token positions of a memorized prompt are aligned
with its anchor's, not one token per concept. `uce_lora` exports the update as a diffusers LoRA (its
truncated SVD at one rank for all layers).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from diffusers.utils import convert_state_dict_to_diffusers

from trainer.core.attention import cross_attention_modules
from trainer.core.unet_core import UNetCore
from trainer.io import MemtrainError

LAYERS = ("to_k", "to_v")
LORA_TOL = 1e-3


def edited_linears(unet, layers: Sequence[str] = LAYERS) -> dict[str, torch.nn.Linear]:
    """{module name: Linear} of the cross-attention projections UCE edits (attn2.<layer> for each layer)."""
    if not layers:
        raise MemtrainError("uce: --layers is empty; name at least one of to_k, to_v")
    modules = dict(unet.named_modules())
    out = {}
    for attn in cross_attention_modules(unet):
        for layer in layers:
            name = f"{attn}.{layer}"
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise MemtrainError(f"uce: the UNet has no Linear {name} (layers must be to_k / to_v)")
            out[name] = module
    if not out:
        raise MemtrainError("uce: the UNet has no cross-attention (attn2) modules")
    return out


def token_embeddings(pipe, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Text-encoder outputs [P, 77, D] (float64) of each prompt, as the pipeline conditions the UNet on them."""
    core = UNetCore(pipe, batch_size)
    table, index, _ = core.encode_prompts(list(prompts))
    return table[index].double()


def _anchor_list(memorized: Sequence[str], anchors: Sequence[str] | None) -> list[str]:
    if not anchors:
        return [""] * len(memorized)
    if len(anchors) == 1:
        return list(anchors) * len(memorized)
    if len(anchors) != len(memorized):
        raise MemtrainError(f"uce: {len(anchors)} anchors for {len(memorized)} memorized prompts; give one anchor "
                            "(used for all) or one per memorized prompt, in the same order")
    return list(anchors)


def low_rank(delta: torch.Tensor, tol: float = LORA_TOL) -> dict:
    """SVD summary of an update: Frobenius norm, numerical rank and the smallest rank with relative residual <= tol."""
    s = torch.linalg.svdvals(delta.double())
    norm = float(s.norm())
    if norm == 0.0:
        return {"fro_norm": 0.0, "rank_for_tol": 0, "numerical_rank": 0, "tol": tol}
    tail = (s.flip(0).square().cumsum(0).flip(0).sqrt() / norm).tolist() + [0.0]  # tail[r] = residual at rank r
    rank = next(r for r, res in enumerate(tail) if res <= tol)
    numerical = int((s > s[0] * max(delta.shape) * torch.finfo(torch.float64).eps).sum())
    return {"fro_norm": norm, "rank_for_tol": rank, "numerical_rank": numerical, "tol": tol}


@torch.no_grad()
def uce_edit(pipe, memorized: list[str], anchors: list[str] | None = None, preserved: list[str] | None = None,
             lam: float = 0.1, preserve_scale: float = 1.0, layers: Sequence[str] = LAYERS,
             batch_size: int = 16) -> dict:
    """Edit the pipeline's UNet in place (module docstring); returns {"changed": {param: count},
    "total_changed", "seconds", "delta": {param: SVD summary of W - W0}, "layers", "lam", "preserve_scale"}."""
    start = time.perf_counter()
    memorized = list(memorized)
    if not memorized:
        raise MemtrainError("uce: no memorized prompt to edit")
    if not lam > 0:
        raise MemtrainError(f"uce: lam must be > 0 (it keeps the solve well posed), got {lam}")
    if preserve_scale < 0:
        raise MemtrainError(f"uce: preserve_scale must be >= 0, got {preserve_scale}")
    anchors = _anchor_list(memorized, anchors)
    preserved = list(preserved or [])
    emb = token_embeddings(pipe, memorized + anchors + preserved, batch_size)
    dim = emb.shape[-1]
    c_e = emb[: len(memorized)].reshape(-1, dim)  # rows are token embeddings
    c_star = emb[len(memorized) : 2 * len(memorized)].reshape(-1, dim)
    c_p = emb[2 * len(memorized) :].reshape(-1, dim)
    # the per-layer sums share these D x D matrices: sum c* c^T and sum c c^T (and the preserved ones)
    cross = c_star.T @ c_e + preserve_scale * (c_p.T @ c_p)
    gram = lam * torch.eye(dim, dtype=torch.float64, device=emb.device) + c_e.T @ c_e + preserve_scale * (c_p.T @ c_p)
    changed, delta = {}, {}
    for name, module in edited_linears(pipe.unet, layers).items():
        if module.in_features != dim:
            raise MemtrainError(f"uce: {name} takes {module.in_features}-dim inputs but the text encoder gives {dim}")
        w0 = module.weight.detach().to(torch.float64)
        lhs = lam * w0 + w0 @ cross.to(w0.device)
        w = torch.linalg.solve(gram.to(w0.device), lhs.T).T  # lhs @ gram^-1 (gram is symmetric)
        new = w.to(module.weight.dtype)
        param = f"{name}.weight"
        changed[param] = int((new != module.weight).sum())
        delta[param] = low_rank(w - w0)
        module.weight.copy_(new)
    return {"changed": changed, "total_changed": sum(changed.values()), "seconds": time.perf_counter() - start,
            "delta": delta, "layers": list(layers), "lam": lam, "preserve_scale": preserve_scale,
            "memorized": len(memorized), "anchors": anchors, "preserved": len(preserved)}


def lora_from_delta(before: dict[str, torch.Tensor], unet, modules: Sequence[str], rank: int | None = None,
                    tol: float = LORA_TOL) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers-format LoRA (keys `unet.<module>.lora.down.weight` / `lora.up.weight`, what
    `convert_state_dict_to_diffusers` makes of peft's lora_A / lora_B) for W - W0 of each Linear in
    `modules` (W0 from `before`, keyed `<module>.weight`), at one rank for all; plus per-layer info."""
    current = dict(unet.named_modules())
    deltas = {}
    for name in modules:
        w = current[name].weight.detach().to(torch.float64)
        deltas[name] = w - before[f"{name}.weight"].to(w.device, torch.float64)
    summaries = {name: low_rank(d, tol) for name, d in deltas.items()}
    if rank is None:
        rank = max(1, max(s["rank_for_tol"] for s in summaries.values()))
    elif int(rank) < 1:
        raise MemtrainError(f"uce: LoRA rank must be >= 1, got {rank}")
    rank = min(int(rank), max(min(d.shape) for d in deltas.values()))
    peft_state, layers = {}, {}
    for name, d in deltas.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        root = s[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        if len(root) < rank:  # a layer of full rank below r: exact, padded with zero components to rank r
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - len(root))], dim=1)
            down = torch.cat([down, down.new_zeros(rank - len(root), down.shape[1])], dim=0)
        norm = float(d.norm())
        residual = float((d - up @ down).norm() / norm) if norm > 0 else 0.0
        dtype = current[name].weight.dtype
        peft_state[f"{name}.lora_A.weight"] = down.to(dtype).contiguous().cpu()
        peft_state[f"{name}.lora_B.weight"] = up.to(dtype).contiguous().cpu()
        layers[f"{name}.weight"] = {"rank_for_tol": summaries[name]["rank_for_tol"], "residual": residual,
                                    "fro_norm": norm}
    state = {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(peft_state).items()}
    return state, {"rank": rank, "tol": tol, "layers": layers,
                   "max_residual": max(v["residual"] for v in layers.values())}


@torch.no_grad()
def uce_lora(pipe, memorized: list[str], anchors: list[str] | None = None, preserved: list[str] | None = None,
             lam: float = 0.1, preserve_scale: float = 1.0, layers: Sequence[str] = LAYERS,
             rank: int | None = None, tol: float = LORA_TOL, batch_size: int = 16) -> dict:
    """The UCE edit as a LoRA; the pipeline's weights are restored (left unedited).

    Returns `uce_edit`'s result plus "lora_state_dict" (diffusers format, see `lora_from_delta`) and
    "lora" ({"rank", "tol", "max_residual", "layers": {param: {"rank_for_tol", "residual", "fro_norm"}}})."""
    modules = edited_linears(pipe.unet, layers)
    before = {f"{name}.weight": m.weight.detach().clone() for name, m in modules.items()}
    result = uce_edit(pipe, memorized, anchors, preserved, lam, preserve_scale, layers, batch_size)
    try:
        state, info = lora_from_delta(before, pipe.unet, list(modules), rank, tol)
    finally:
        for name, m in modules.items():
            m.weight.copy_(before[f"{name}.weight"])
    return {**result, "lora_state_dict": state, "lora": info}
