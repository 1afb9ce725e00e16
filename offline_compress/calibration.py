"""Calibration: input Grams of every target linear, one decoder layer at a time.

The model is never run whole on the device: the embeddings' output is captured at the
first decoder layer (GPTQ's "catcher" trick), then each layer is moved to the device in
float32, run on the stored hidden states with Gram hooks, and moved back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[group] = grams[group] + x.T @ x if group in grams else x.T @ x

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


def gram_key(target: str) -> str:
    """The input group whose Gram linear ``target`` (e.g. ``self_attn.q_proj``) uses: the linears vLLM fuses
    into one layer (``format.FUSED_MODULES``) read the same input, e.g. ``self_attn.q_proj,k_proj,v_proj``."""
    parent, _, leaf = target.rpartition(".")
    group = ",".join(fmt.fused_group(leaf))
    return f"{parent}.{group}" if parent else group


def calibration_token_count(inputs: LayerInputs) -> int:
    return sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
