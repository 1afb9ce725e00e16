"""``--allocation sensitivity``: one calibration pass over the original layers measures every module's
whitened spectrum; ``allocation.allocate`` turns the spectra into per-module byte budgets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from offline_compress import allocation
from offline_compress.calibration import gram_key, run_layer
from offline_compress.layer import shared_problem
from offline_compress.loading import materialize, release, return_free_memory
from offline_compress.whitening import whitening_factor


def sensitivity_ratios(loop, groups: list[list[int]], partial: Path, log) -> dict[str, float]:
    """{unit key: ratio} from one pass over the original layers of ``loop`` (a ``pipeline.LayerLoop``).
    Saved in the partial directory, so a resumed run does not redo it.

    A unit is a module, or one shared dictionary's group (key: its first member's prefix)."""
    saved = partial / "allocation.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    inputs, options = loop.inputs, loop.options
    hidden = inputs.hidden
    spectra = []
    for group in tqdm(groups, desc="measuring sensitivity", unit="group", file=sys.stderr):
        members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for index in group:
            layer = loop.layers[index]
            materialize(layer, f"model.layers.{index}", loop.source, loop.device, torch.float32)
            targets = list(options.targets) if index in loop.layer_ids else []
            grams, inputs.hidden = run_layer(layer, inputs, loop.device, targets)
            for name in targets:
                prefix = f"model.layers.{index}.{name}"
                weight = layer.get_submodule(name).weight.detach().cpu()
                key = name if name in loop.shared else prefix
                members.setdefault(key, []).append((prefix, weight, grams[gram_key(name)]))
            release(layer)
        for items in members.values():
            weight, gram = shared_problem([w for _, w, _ in items], [g for _, _, g in items])
            spectra.append(allocation.spectrum(items[0][0], weight, whitening_factor(gram)[0]))
        del members
        return_free_memory()
    inputs.hidden = hidden
    ratios = allocation.allocate(spectra, options.ratio, options.value_dtype, options.dictionary_dtype)
    by_kind: dict[str, list[float]] = {}
    for key, ratio in ratios.items():
        by_kind.setdefault(key.rsplit(".", 1)[1], []).append(ratio)
    log("sensitivity allocation (mean ratio per module kind): "
        + ", ".join(f"{kind} {sum(r) / len(r):.3f}" for kind, r in by_kind.items()))
    saved.write_text(json.dumps(ratios, indent=1))
    return ratios
