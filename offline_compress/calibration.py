"""Calibration: input Grams of every target linear, one decoder layer at a time.

The model is never run whole on the device: the embeddings' output is captured at the
first decoder layer (GPTQ's "catcher" trick), then each layer is moved to the device in
float32, run on the stored hidden states with Gram hooks, and moved back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn

from cospadi_vllm import format as fmt


@dataclass
class LayerInputs:
    """What a decoder layer is called with, per calibration batch.

    hidden: list of [batch, seq, hidden] float32 tensors (kept on CPU between layers);
    kwargs: list of the keyword arguments the model passed to its first layer for that batch
    (rotary position embeddings, masks, position ids), reused for every layer.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> LayerInputs:
    """Run the model up to its first decoder layer for input_ids [N, T]; store what layer 0 receives."""
    layers = decoder_layers(model)
    first = layers[0]
    captured = LayerInputs(hidden=[], kwargs=[])

    class Catcher(nn.Module):
        def __init__(self, wrapped: nn.Module):
            super().__init__()
            self.wrapped = wrapped
            self.attention_type = getattr(wrapped, "attention_type", "full_attention")

        def forward(self, hidden_states, *args, **kwargs):
            captured.hidden.append(hidden_states.detach().float().cpu())
            kwargs = {key: _to(val, "cpu") for key, val in kwargs.items() if key not in ("past_key_values", "past_key_value")}
            kwargs["use_cache"] = False
            captured.kwargs.append(kwargs)
            raise _StopForward

    layers[0] = Catcher(first)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        layers[0] = first
    return captured


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    device: torch.device,
    gram_targets: Iterable[str] = (),
    collect_outputs: bool = True,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Run one decoder layer (already on ``device``, float32) over all calibration batches.

    gram_targets: names of linears inside the layer whose input Grams to accumulate.
    Returns ({input group: Gram [in, in] float64 on device}, outputs like inputs.hidden).
    """
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name in gram_targets:
        group = gram_key(name)
        if any(gram_key(other) == group for other in gram_targets if other < name):
            continue  # another linear of this group already accumulates the shared Gram

        def hook(_module, args, group=group):
            product = gram(args[0].reshape(-1, args[0].shape[-1]))
            grams[group] = grams[group] + product if group in grams else product

        handles.append(layer.get_submodule(name).register_forward_pre_hook(hook))
    outputs = []
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
            result = layer(hidden.to(device), **{k: _to(v, device) for k, v in kwargs.items()})
            result = result[0] if isinstance(result, tuple) else result
            if collect_outputs:
                outputs.append(result.float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return grams, outputs


# Row slabs of a wide input's Gram: each slab is multiplied from its diagonal block rightwards only, and the part
# below the diagonal blocks is mirrored — (b + 1) / 2b of the full product's FLOPs. The float64 Grams of wide inputs
# (a 0.5B model's down_proj: 4864 wide) were most of the calibration time on an AVX2 CPU (NOTES.md item 78).
GRAM_BLOCK_WIDTH = 512
MIN_BLOCKED_WIDTH = 1024


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx [d, d] in float64 for inputs x [tokens, d]; for d ≥ MIN_BLOCKED_WIDTH by slabs of about
    GRAM_BLOCK_WIDTH rows, each computed from its diagonal block rightwards, the rest mirrored."""
    x = x.double()
    d = x.shape[1]
    if d < MIN_BLOCKED_WIDTH:
        return x.T @ x
    slabs = -(-d // GRAM_BLOCK_WIDTH)
    edges = [d * index // slabs for index in range(slabs + 1)]
    product = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    for lo, hi in pairwise(edges):
        product[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])  # a row-major view: BLAS writes it in place
    for lo, hi in pairwise(edges[:-1]):
        product[hi:, lo:hi] = product[lo:hi, hi:].T
    return product


def gram_key(target: str) -> str:
    """The input group whose Gram linear ``target`` (e.g. ``self_attn.q_proj``) uses: the linears vLLM fuses
    into one layer (``format.FUSED_MODULES``) read the same input, e.g. ``self_attn.q_proj,k_proj,v_proj``."""
    parent, _, leaf = target.rpartition(".")
    group = ",".join(fmt.fused_group(leaf))
    return f"{parent}.{group}" if parent else group


def calibration_token_count(inputs: LayerInputs) -> int:
    return sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
