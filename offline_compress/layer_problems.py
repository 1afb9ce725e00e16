"""Real compression problems for studies and tests: chosen linears of a real model with the input Grams the
compressor would see, calibrated one-shot (every earlier layer dense) on the built-in Wikipedia split.

The model is streamed as the compressor streams it (``loading``): one decoder layer in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from offline_compress import assets
from offline_compress.calibration import decoder_layers, gram_key, run_layer
from offline_compress.export import source_safetensors
from offline_compress.loading import (
    SafetensorsSource,
    first_layer_inputs,
    load_tokenizer,
    materialize,
    release,
    skeleton_model,
)


def real_layer_problems(
    model_dir: Path,
    layers: Iterable[int],
    targets: Iterable[str],
    samples: int = 32,
    seq_len: int = 512,
    text_chars: int | None = None,
    batch_size: int = 8,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"3.mlp.gate_proj": (weight [out, in] float32, Gram [in, in] float64)} for each of ``targets`` in each of
    ``layers``, on CPU.

    Calibration: ``samples`` × ``seq_len`` random windows (seed 0) of the first ``text_chars`` characters of the
    built-in calibration split (all of it when None — with the defaults, the compressor's own default calibration).
    Linears sharing an input (q / k / v, gate / up) share one Gram tensor.
    """
    layers, targets = sorted(set(layers)), list(targets)
    tokenizer = load_tokenizer(model_dir)
    stream = assets.tokenize_stream(tokenizer, assets.wikipedia_split("calibration")[:text_chars])
    source = SafetensorsSource(source_safetensors(model_dir))
    model = skeleton_model(model_dir)
    cpu = torch.device("cpu")
    inputs = first_layer_inputs(model, source, assets.random_windows(stream, samples, seq_len, seed=0), cpu, batch_size)
    problems = {}
    for index, layer in enumerate(decoder_layers(model)[: layers[-1] + 1]):
        materialize(layer, f"model.layers.{index}", source, cpu, torch.float32)
        wanted = targets if index in layers else []
        grams, inputs.hidden = run_layer(layer, inputs, cpu, wanted, collect_outputs=index < layers[-1])
        for target in wanted:
            weight = layer.get_submodule(target).weight.detach().clone()
            problems[f"{index}.{target}"] = (weight, grams[gram_key(target)])
        release(layer)
    return problems
