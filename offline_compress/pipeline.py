"""compress_model: HF model directory → CoSpaDi checkpoint directory.

Layer by layer: Grams from the calibration hidden states → compress each target linear →
(sequential mode) swap in the reconstructed weights → hidden states for the next layer.
Finished layer groups are saved under ``.<out>.partial/`` (``resume``) so an interrupted run resumes there.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cospadi_vllm import codec
from cospadi_vllm import format as fmt
from offline_compress import resume
from offline_compress.calibration import LayerInputs, decoder_layers, gram_key, run_layer
from offline_compress.calibration_text import calibration_ids
from offline_compress.export import quantization_config, source_safetensors, write_checkpoint
from offline_compress.layer import LayerSettings, compress_shared
from offline_compress.loading import (
    SafetensorsSource,
    check_finite_weights,
    first_layer_inputs,
    materialize,
    release,
    return_free_memory,
    skeleton_model,
    validate_model_dir,
)
from offline_compress.options import CompressError, CompressOptions, validate_options, workspace_bytes
from offline_compress.precision import compress_fused
from offline_compress.report import build_report, module_stats, peak_rss_bytes, reset_peak_rss
from offline_compress.sensitivity import sensitivity_ratios

Tensors = dict[str, dict[str, torch.Tensor]]  # {module prefix: {format suffix: tensor}}


@dataclass
class LayerLoop:
    """What every step of the layer loop reads: the model's layers, where weights come from, the options."""

    layers: torch.nn.ModuleList
    source: SafetensorsSource
    options: CompressOptions
    device: torch.device
    settings: LayerSettings
    inputs: LayerInputs  # the current group's inputs; advanced group by group
    layer_ids: list[int]  # the decoder layers compressed (all, unless options.layers)
    shared: set[str]  # targets whose dictionary a group shares
    ratios: dict[str, float] | None  # per-module (or per-group) budgets of --allocation sensitivity

    def ratio(self, key: str) -> float:
        return self.options.ratio if self.ratios is None else self.ratios[key]


def layer_groups(n_layers: int, group_size: int) -> list[list[int]]:
    """Consecutive decoder layers that share dictionaries: [[0, …, G−1], [G, …], …] (the last may be shorter)."""
    return [list(range(first, min(first + group_size, n_layers))) for first in range(0, n_layers, group_size)]


def compress_model(model_dir: str | Path, out_dir: str | Path, options: CompressOptions, log=print) -> dict:
    """Compress the target linears of a Llama/Qwen model; write the checkpoint; return the report.

    Streams the model: weights are read from the source safetensors one decoder layer at a time
    (``offline_compress.loading``); each finished layer group goes to ``.<out>.partial/`` at once, and the
    checkpoint is assembled from those files at the end.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    device = validate_options(options)
    config, tokenizer = validate_model_dir(model_dir, out_dir, options.overwrite)
    source = SafetensorsSource(source_safetensors(model_dir))
    check_finite_weights(source)
    started = time.perf_counter()
    reset_peak_rss()
    input_ids = calibration_ids(tokenizer, options)
    model = skeleton_model(model_dir)
    param_count = sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once, before any is replaced
    layers = decoder_layers(model)
    layer_ids = list(range(len(layers))) if options.layers is None else options.layers
    partial = resume.open_partial(out_dir, options, model_dir)

    log(f"calibration: {input_ids.shape[0]} x {input_ids.shape[1]} tokens; {len(layer_ids)} layers; device {device}")
    inputs = first_layer_inputs(model, source, input_ids, device, options.batch_size)
    settings = LayerSettings(method=options.method, value_dtype=options.value_dtype,
                             dictionary_dtype=options.dictionary_dtype, k_over_s=options.learned_k_over_s,
                             iterations=options.iterations, seed=options.seed,
                             workspace_bytes=workspace_bytes(options.max_memory_gb, device))
    loop = LayerLoop(layers, source, options, device, settings, inputs, layer_ids,
                     set(options.group_targets) if options.group_size > 1 else set(), None)
    groups = layer_groups(len(layers), options.group_size)
    if options.allocation == "sensitivity":
        loop.ratios = sensitivity_ratios(loop, groups, partial, log)
    stats, part_files = compress_layers(loop, groups, partial)
    ratios = loop.ratios
    del loop, inputs
    return_free_memory()

    report = build_report(param_count, config, model_dir, options, stats, time.perf_counter() - started,
                          peak_rss_bytes())
    if ratios is not None:
        report["allocation"] = ratios
    owners = {prefix: s["dictionary"] for prefix, s in stats.items() if "dictionary" in s}
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    write_checkpoint(model_dir, out_dir, part_files, quantization_config(stats, options, owners), report,
                     dtype=dtype)
    shutil.rmtree(partial, ignore_errors=True)
    return report


def compress_layers(loop: LayerLoop, groups: list[list[int]], partial: Path) -> tuple[dict, list[Path]]:
    """Every layer group in order (resumed from its partial file where one exists) → (report entries of all
    modules, the partial files holding their tensors)."""
    stats: dict[str, dict] = {}
    part_files: list[Path] = []
    n_layers = len(loop.layers)
    bar = tqdm(total=n_layers, desc="compressing layers", unit="layer", file=sys.stderr)
    try:  # the bar is closed before an error reaches the caller (its last line must be the error)
        for group in groups:
            part_file = resume.group_file(partial, group[0])
            resumed = any(index in loop.layer_ids for index in group) and part_file.is_file()
            group_inputs = loop.inputs.hidden
            if resumed:
                tensors, group_stats = resume.load_group(part_file)
                group_outputs = None
                bar.update(len(group))
            else:
                tensors, group_stats, group_outputs = compress_group(loop, group, bar)
                if group_stats:
                    resume.save_group(part_file, tensors, group_stats)
            if group_stats:
                part_files.append(part_file)
            stats.update(group_stats)
            if group[-1] != n_layers - 1:
                advance_inputs(loop, group, group_inputs, group_outputs, tensors, group_stats, resumed)
            del tensors
            for index in group:
                release(loop.layers[index])
            return_free_memory()
            if stats:
                errors = [s["whitened_rel_error"] for s in stats.values()]
                bar.set_postfix(mean_err=f"{sum(errors) / len(errors):.3f}")
    finally:
        bar.close()
    return stats, part_files


def compress_group(loop: LayerLoop, group: list[int], bar) -> tuple[Tensors, dict, list | None]:
    """Calibrate and compress one layer group → (tensors, report entries, the last layer's outputs when
    they were collected on the way: one-shot calibration; None otherwise).

    Inside a group, each layer calibrates on the previous one's outputs (its per-layer modules swapped in
    when sequential); shared dictionaries are learned once every layer of the group has its Gram."""
    options, inputs = loop.options, loop.inputs
    tensors: Tensors = {}
    stats: dict[str, dict] = {}
    members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}  # shared target → its layers
    outputs = None
    for index in group:
        layer = loop.layers[index]
        materialize(layer, f"model.layers.{index}", loop.source, loop.device, torch.float32)
        targets = list(options.targets) if index in loop.layer_ids else []
        outputs = None
        if targets:
            grams, outputs = run_layer(layer, inputs, loop.device, targets, collect_outputs=not options.sequential)
            for name in targets:
                if name in loop.shared:  # learned once every layer of the group is calibrated
                    prefix = f"model.layers.{index}.{name}"
                    members.setdefault(name, []).append((prefix, layer.get_submodule(name).weight.detach(),
                                                         grams[gram_key(name)]))
            own = [t for t in targets if t not in loop.shared]
            for key in dict.fromkeys(map(gram_key, own)):
                # The modules reading one input are one vLLM layer: compressed together (one precision).
                names = [t for t in own if gram_key(t) == key]
                prefixes = [f"model.layers.{index}.{t}" for t in names]
                weights = [layer.get_submodule(t).weight.detach() for t in names]
                results = _compress(loop, ", ".join(prefixes), compress_fused, weights, grams[key],
                                    [loop.ratio(p) for p in prefixes], loop.settings)
                for prefix, result in zip(prefixes, results, strict=True):
                    tensors[prefix], stats[prefix] = result.tensors, module_stats(result)
                del results
                return_free_memory()
            del grams
        if index != group[-1]:  # the group's next layer calibrates on this one's outputs
            if options.sequential or outputs is None:
                if options.sequential:
                    swap_in(layer, index, tensors, stats, loop.device)
                _, outputs = run_layer(layer, inputs, loop.device)
            inputs.hidden = outputs
        bar.update(1)
    for items in members.values():
        owner = items[0][0]
        results = _compress(loop, owner, compress_shared, [w for _, w, _ in items], [g for _, _, g in items],
                            loop.ratio(owner), loop.settings)
        for (prefix, _, _), result in zip(items, results, strict=True):
            tensors[prefix] = result.tensors
            stats[prefix] = module_stats(result, owner if prefix != owner else None)
        del results
        return_free_memory()
    return tensors, stats, outputs


def advance_inputs(loop: LayerLoop, group: list[int], group_inputs: list, group_outputs: list | None,
                   tensors: Tensors, stats: dict, resumed: bool) -> None:
    """What the group really outputs feeds the next one: with sequential calibration the compressed
    layers (shared dictionaries included, which exist only now) run again from the group's inputs;
    one-shot, the original layers' outputs (collected on the way, or recomputed after a resume)."""
    sequential = loop.options.sequential
    if not sequential and group_outputs is not None:
        loop.inputs.hidden = group_outputs
        return
    loop.inputs.hidden = group_inputs
    for index in group:
        if resumed:
            materialize(loop.layers[index], f"model.layers.{index}", loop.source, loop.device, torch.float32)
        if sequential:
            swap_in(loop.layers[index], index, tensors, stats, loop.device)
        _, loop.inputs.hidden = run_layer(loop.layers[index], loop.inputs, loop.device)


def _compress(loop: LayerLoop, prefix: str, compress, *args):
    """``compress(*args)`` with running out of memory reported as a CompressError naming the module."""
    try:
        return compress(*args)
    except (torch.OutOfMemoryError, MemoryError):
        raise CompressError(
            f"out of memory compressing {prefix} on {loop.device} (workspace "
            f"{loop.settings.workspace_bytes / 2**30:.2f} GiB); finished layers are kept: rerun with a "
            "smaller --max-memory (GiB) or free memory, and the run resumes") from None


def swap_in(layer: torch.nn.Module, index: int, tensors: Tensors, stats: dict[str, dict], device: torch.device) -> None:
    """Give layer ``index``'s compressed modules their reconstructed weights (Wᵀ = D·C), so later layers
    calibrate on what the compressed model really feeds them (as GPTQ does)."""
    marker = f"model.layers.{index}."
    for prefix, layer_tensors in tensors.items():
        if not prefix.startswith(marker):
            continue
        owner = stats[prefix].get("dictionary", prefix)
        layer_tensors = {**layer_tensors, **fmt.dictionary_tensors(tensors[owner])}
        weight_t = codec.reconstruct_weight_t(layer_tensors, stats[prefix]["k"])
        layer.get_submodule(prefix[len(marker):]).weight.data = weight_t.T.contiguous().to(device)


def compress_or_reuse(model_dir: str | Path, out_dir: str | Path, options: CompressOptions, log=print) -> dict:
    """compress_model, unless ``out_dir`` already holds a checkpoint finished with the same model and options.

    For tools that own their output directory (the demo, the quality benchmark): a finished checkpoint
    made differently is replaced, and the log says which options differed.
    """
    import json

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    report_path = out_dir / "compress_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        differing = resume.differing_options(report, model_dir, options)
        if not differing:
            log(f"reusing the finished checkpoint in {out_dir} (same model and options)")
            return report
        changes = ", ".join(f"{k} {made} -> {asked}" for k, (made, asked) in differing.items())
        log(f"{out_dir} was compressed differently ({changes}): compressing again")
        options = replace(options, overwrite=True)
    return compress_model(model_dir, out_dir, options, log=log)
