"""compress_model: HF model directory → CoSpaDi checkpoint directory.

Layer by layer: Grams from the calibration hidden states → compress each target linear →
(sequential mode) swap in the reconstructed weights → hidden states for the next layer.
Finished layers are saved under ``.<out>.partial/`` so an interrupted run resumes there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cospadi_vllm import format as fmt
from offline_compress import allocation, assets, loading
from offline_compress.calibration import (
    DEFAULT_TARGETS,
    capture_layer_inputs,
    decoder_layers,
    gram_key,
    run_layer,
)
from offline_compress.export import quantization_config, source_safetensors, write_checkpoint
from offline_compress.layer import (
    DEFAULT_K_OVER_S,
    METHODS,
    LayerSettings,
    compress_linear,
    compress_shared,
    shared_problem,
)
from offline_compress.loading import SafetensorsSource, release, return_free_memory, skeleton_model
from offline_compress.whitening import whitening_factor

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
BUILTIN_CALIBRATION = "wikipedia"
CHAT_CALIBRATION = "wikipedia-chat"  # the same split as chat exchanges in the model's own chat template
# The projections the paper shares across layers (its appendix; Basis Sharing shares the same ones and
# keeps o_proj and down_proj per layer).
DEFAULT_GROUP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ALLOCATIONS = ("uniform", "sensitivity")
CHAT_CHUNK_CHARS = 1200  # one exchange per ~410 tokens on SmolLM2: every 512-token window holds a turn boundary


class CompressError(Exception):
    """A user-caused problem: bad path, bad option, bad model or data. One line, names the thing."""


@dataclass
class CompressOptions:
    ratio: float = 0.3
    method: str = "cospadi"
    k_over_s: tuple[float, ...] = DEFAULT_K_OVER_S  # several: per-module structure search; one: forced
    value_dtype: str = "int8"
    iterations: int = 8
    calib: str = BUILTIN_CALIBRATION
    calib_samples: int = 32
    seq_len: int = 512
    targets: tuple[str, ...] = DEFAULT_TARGETS
    device: str = "cpu"
    seed: int = 0
    sequential: bool = True
    batch_size: int = 8
    dtype: str = "auto"
    overwrite: bool = False
    max_memory_gb: float | None = None  # sparse-coding workspace budget; None = automatic
    group_size: int = 1  # consecutive layers sharing one dictionary per group target (1 = per layer)
    group_targets: tuple[str, ...] = DEFAULT_GROUP_TARGETS
    allocation: str = "uniform"  # or "sensitivity": per-module ratios, same total bytes
    layers: list[int] | None = field(default=None)  # restrict to these decoder layers (tests, debugging)

    def affecting(self) -> dict:
        """The options that change the checkpoint, JSON-normalised (tuples as lists) to compare with a report.

        Where the work runs (device, batch size, memory budget) does not change what is computed.
        """
        options = {k: v for k, v in asdict(self).items() if k not in ("overwrite", *RUN_ONLY_OPTIONS)}
        return json.loads(json.dumps(options, default=str))

    def fingerprint(self, model_dir: Path) -> str:
        """Identifies a run for resuming: same model files and same result-affecting options.

        A file is identified by its size, mtime and a hash of its safetensors header (tensor names,
        dtypes, shapes, offsets): replacing the weights means writing the file again (new mtime), and
        a different model has a different header; hashing the data itself would read the whole model.
        """
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns, _header_hash(p)] for p in source_safetensors(model_dir)}
        payload = json.dumps({"model": str(model_dir.resolve()), "files": files, **self.affecting()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def layer_settings(self, device: torch.device) -> LayerSettings:
        return LayerSettings(
            method=self.method,
            value_dtype=self.value_dtype,
            k_over_s=tuple(self.k_over_s),
            iterations=self.iterations,
            seed=self.seed,
            workspace_bytes=workspace_bytes(self.max_memory_gb, device),
        )


RUN_ONLY_OPTIONS = ("device", "batch_size", "max_memory_gb")


def _header_hash(path: Path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(min(size, 100 << 20))).hexdigest()[:16]


def workspace_bytes(max_memory_gb: float | None, device: torch.device) -> int:
    """Sparse-coding workspace budget: the user's --max-memory, else a quarter of what is free (≤ 1 GiB)."""
    if max_memory_gb is not None:
        return int(max_memory_gb * 1024**3)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(free // 4, 1024**3))


def validate_options(model_dir: Path, out_dir: Path, options: CompressOptions):
    """Check everything checkable before any work; return (the model's config.json, its tokenizer)."""
    if not 0.0 < options.ratio < 1.0:
        raise CompressError(f"--ratio must be in (0, 1), got {options.ratio}")
    if not options.k_over_s or any(not v >= 1.0 for v in options.k_over_s):
        raise CompressError(f"--k-over-s values must be >= 1, got {','.join(map(str, options.k_over_s)) or '(none)'}")
    if options.max_memory_gb is not None and not options.max_memory_gb > 0:
        raise CompressError(f"--max-memory must be > 0 GiB, got {options.max_memory_gb}")
    if options.method not in METHODS:
        raise CompressError(f"--method must be one of {METHODS}, got {options.method!r}")
    if options.value_dtype not in fmt.VALUE_DTYPES:
        raise CompressError(f"--value-dtype must be one of {sorted(fmt.VALUE_DTYPES)}, got {options.value_dtype!r}")
    if options.iterations < 0:
        raise CompressError(f"--iterations must be >= 0, got {options.iterations}")
    if options.calib_samples < 1 or options.seq_len < 2:
        raise CompressError("--calib-samples must be >= 1 and --seq-len >= 2")
    unknown = [t for t in options.targets if t not in DEFAULT_TARGETS]
    if unknown or not options.targets:
        raise CompressError(f"--targets {unknown or '(empty)'} not among {', '.join(DEFAULT_TARGETS)}")
    if options.group_size < 1:
        raise CompressError(f"--group-size must be >= 1, got {options.group_size}")
    if options.group_size > 1:
        outside = [t for t in options.group_targets if t not in options.targets]
        if outside or not options.group_targets:
            raise CompressError(f"--group-targets {outside or '(empty)'} not among --targets {','.join(options.targets)}")
        for target in options.group_targets:  # vLLM fuses the linears that read one input into one layer
            fused = [t for t in options.targets if gram_key(t) == gram_key(target)]
            if not set(fused) <= set(options.group_targets):
                raise CompressError(
                    f"--group-targets has {target} but not {','.join(t for t in fused if t not in options.group_targets)}"
                    f": vLLM fuses {','.join(fused)} into one layer, so they share dictionaries together or not at all")
    if options.allocation not in ALLOCATIONS:
        raise CompressError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {options.allocation!r}")
    try:
        device = torch.device(options.device)
    except (RuntimeError, ValueError):
        raise CompressError(f"--device {options.device!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise CompressError(f"--device {options.device!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressError(f"--device {options.device} requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CompressError(f"--device {options.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if options.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise CompressError(f"--dtype must be auto, bfloat16, float16 or float32, got {options.dtype!r}")
    if not model_dir.is_dir():
        raise CompressError(f"model directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CompressError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CompressError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CompressError(f"{config_path} is not a JSON object")
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise CompressError(
            f"{model_dir}: architecture {architectures or config.get('model_type')} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise CompressError(f"{model_dir} is already quantized ({method}); compress an unquantized model")
    try:
        files = source_safetensors(model_dir)
    except FileNotFoundError as err:
        raise CompressError(str(err)) from None
    from cospadi_vllm.check import file_problems

    for path in files:
        problems = file_problems(path)[1]
        if problems:
            raise CompressError(f"{model_dir}/{problems[0]}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError… depending on what is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CompressError(f"{model_dir}: no usable tokenizer ({first})") from None
    if out_dir.exists() and not options.overwrite:
        raise CompressError(f"output directory {out_dir} already exists (pass --overwrite to replace it)")
    if out_dir.resolve() == model_dir.resolve():
        raise CompressError("output directory must differ from the model directory")
    return config, tokenizer


def check_finite_weights(source: SafetensorsSource) -> None:
    """Raise CompressError naming the first tensor with NaN or Inf (reads one tensor at a time)."""
    for name in source.names():
        tensor = source.get(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompressError(f"weight {name} in {source.location[name].name} contains NaN or Inf")


def chat_calibration_text(tokenizer, text: str) -> str:
    """``text`` as a run of chat exchanges rendered with the tokenizer's chat template.

    Paragraphs are grouped into chunks of about CHAT_CHUNK_CHARS; in each chunk the first paragraph
    is the user's turn and the rest the assistant's; a trailing chunk shorter than that is dropped. Plain-text calibration never shows the model
    its turn markers, so whitening neglects the directions the first answer token depends on
    (a CR 0.3 checkpoint calibrated on plain Wikipedia answered chat questions with an empty string).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CompressError(f"--calib {CHAT_CALIBRATION} needs a tokenizer with a chat template; this one has none")
    chunks, current = [], []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if paragraph:
            current.append(paragraph)
        if current and sum(len(p) for p in current) >= CHAT_CHUNK_CHARS:
            chunks.append(current)
            current = []
    exchanges = []
    for chunk in chunks:
        if len(chunk) < 2:  # one long paragraph: the user's turn is its first sentence
            head, _, tail = chunk[0].partition(". ")
            chunk = [head + ".", tail]
        messages = [{"role": "user", "content": chunk[0]}, {"role": "assistant", "content": "\n\n".join(chunk[1:])}]
        exchanges.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return "".join(exchanges)


def calibration_text(calib: str, tokenizer=None) -> str:
    """Text from the built-in Wikipedia split (plain or as chat exchanges, which needs the tokenizer),
    a .txt file, or a .jsonl file of {"text": ...}."""
    if calib == BUILTIN_CALIBRATION:
        return assets.wikipedia_split("calibration")
    if calib == CHAT_CALIBRATION:
        return chat_calibration_text(tokenizer, assets.wikipedia_split("calibration"))
    path = Path(calib)
    if not path.is_file():
        raise CompressError(f"calibration file {path} does not exist")
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise CompressError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
            text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise CompressError(f"{path}:{lineno} has no string 'text' field")
            texts.append(text)
        return "\n\n".join(texts)
    return path.read_text()


def calibration_ids(tokenizer, options: CompressOptions) -> torch.Tensor:
    stream = assets.tokenize_stream(tokenizer, calibration_text(options.calib, tokenizer))
    if stream.numel() < options.seq_len:
        raise CompressError(
            f"calibration text has {stream.numel()} tokens, fewer than one sequence of --seq-len {options.seq_len}"
        )
    return assets.random_windows(stream, options.calib_samples, options.seq_len, options.seed)


def _partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _load_partial_layer(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    with safe_open(str(path), framework="pt") as fh:
        stats = json.loads(fh.metadata()["stats"])
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in fh.keys():
            prefix, suffix = name.rsplit(".", 1)
            tensors.setdefault(prefix, {})[suffix] = fh.get_tensor(name)
    return tensors, stats


def _save_partial_layer(path: Path, tensors: dict[str, dict[str, torch.Tensor]], stats: dict) -> None:
    flat = {f"{prefix}.{suffix}": t for prefix, group in tensors.items() for suffix, t in group.items()}
    tmp = path.with_suffix(".tmp")
    save_file(flat, str(tmp), metadata={"stats": json.dumps(stats)})
    tmp.rename(path)


def compress_model(model_dir: str | Path, out_dir: str | Path, options: CompressOptions, log=print) -> dict:
    """Compress the target linears of a Llama/Qwen model; write the checkpoint; return the report.

    Streams the model: weights are read from the source safetensors one decoder layer at a time
    (``offline_compress.loading``); each finished layer goes to ``.<out>.partial/`` at once, and the
    checkpoint is assembled from those files at the end.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config, tokenizer = validate_options(model_dir, out_dir, options)
    source = SafetensorsSource(source_safetensors(model_dir))
    check_finite_weights(source)
    started = time.perf_counter()
    input_ids = calibration_ids(tokenizer, options)
    device = torch.device(options.device)
    model = skeleton_model(model_dir)
    param_count = sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once, before any is replaced
    layers = decoder_layers(model)
    layer_ids = list(range(len(layers))) if options.layers is None else options.layers
    settings = options.layer_settings(device)

    partial = _partial_dir(out_dir)
    fingerprint = options.fingerprint(model_dir)
    stamp = partial / "run.json"
    if partial.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("fingerprint") != fingerprint):
        shutil.rmtree(partial)  # left by a run with other options or other weights: not resumable
    partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "options": asdict(options)}, default=str))

    log(f"calibration: {input_ids.shape[0]} x {input_ids.shape[1]} tokens; {len(layer_ids)} layers; device {device}")
    embed = model.get_input_embeddings()
    materialize(embed, _module_prefix(model, embed), source, device)
    if getattr(model.model, "rotary_emb", None) is not None:
        model.model.rotary_emb.to(device)
    inputs = capture_layer_inputs(model, input_ids.to(device), options.batch_size)
    release(embed)
    groups = layer_groups(len(layers), options.group_size)
    shared = set(options.group_targets) if options.group_size > 1 else set()
    ratios = None
    if options.allocation == "sensitivity":
        ratios = sensitivity_ratios(layers, groups, layer_ids, shared, inputs, source, options, device, partial, log)
    module_stats: dict[str, dict] = {}
    shapes: dict[str, fmt.LayerShape] = {}
    part_files: list[Path] = []
    bar = tqdm(total=len(layers), desc="compressing layers", unit="layer", file=sys.stderr)
    try:  # the bar is closed before an error reaches the caller (its last line must be the error)
        for group in groups:
            part_file = partial / f"layer-{group[0]:05d}.safetensors"
            compressed = [index for index in group if index in layer_ids]
            resumed = bool(compressed) and part_file.is_file()
            last = group[-1] == len(layers) - 1
            group_inputs, group_outputs = inputs.hidden, None
            group_tensors: dict[str, dict[str, torch.Tensor]] = {}
            group_stats: dict[str, dict] = {}
            if resumed:
                group_tensors, group_stats = _load_partial_layer(part_file)
                bar.update(len(group))
            else:
                members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}  # shared target → its layers
                for index in group:
                    layer = layers[index]
                    materialize(layer, f"model.layers.{index}", source, device, torch.float32)
                    targets = list(options.targets) if index in compressed else []
                    outputs = None
                    if targets:
                        grams, outputs = run_layer(layer, inputs, device, targets, collect_outputs=not options.sequential)
                        for name in targets:
                            prefix = f"model.layers.{index}.{name}"
                            weight, gram = layer.get_submodule(name).weight.detach(), grams[gram_key(name)]
                            if name in shared:  # learned once every layer of the group is calibrated
                                members.setdefault(name, []).append((prefix, weight, gram))
                                continue
                            result = _compress(prefix, device, settings, compress_linear, weight, gram,
                                               _ratio(ratios, prefix, options.ratio), settings)
                            group_tensors[prefix] = result.tensors
                            group_stats[prefix] = _module_stats(result, options.value_dtype)
                            del result
                            return_free_memory()
                        del grams
                    if index != group[-1]:  # the group's next layer calibrates on this one's outputs
                        if options.sequential or outputs is None:
                            if options.sequential:
                                _swap_in(layer, index, group_tensors, group_stats, device)
                            _, outputs = run_layer(layer, inputs, device)
                        inputs.hidden = outputs
                    group_outputs = outputs
                    bar.update(1)
                for items in members.values():
                    owner = items[0][0]
                    results = _compress(owner, device, settings, compress_shared, [w for _, w, _ in items],
                                        [g for _, _, g in items], _ratio(ratios, owner, options.ratio), settings)
                    for (prefix, _, _), result in zip(items, results, strict=True):
                        group_tensors[prefix] = result.tensors
                        group_stats[prefix] = _module_stats(result, options.value_dtype, owner if prefix != owner else None)
                    del results
                    return_free_memory()
                del members
                if group_stats:
                    _save_partial_layer(part_file, group_tensors, group_stats)
            if group_stats:
                part_files.append(part_file)
            module_stats.update(group_stats)
            shapes.update(_shapes(group_stats))
            if not last and (options.sequential or group_outputs is None):
                # What the group really outputs feeds the next one: with sequential calibration, the
                # compressed layers (shared dictionaries included, which exist only now) run again from
                # the group's inputs; one-shot (after a resume), the original layers.
                inputs.hidden = group_inputs
                for index in group:
                    if resumed:
                        materialize(layers[index], f"model.layers.{index}", source, device, torch.float32)
                    if options.sequential:
                        _swap_in(layers[index], index, group_tensors, group_stats, device)
                    _, inputs.hidden = run_layer(layers[index], inputs, device)
            elif not last:
                inputs.hidden = group_outputs
            del group_tensors
            for index in group:
                release(layers[index])
            return_free_memory()
            if module_stats:
                errors = [s["whitened_rel_error"] for s in module_stats.values()]
                bar.set_postfix(mean_err=f"{sum(errors) / len(errors):.3f}")
    finally:
        bar.close()
    del inputs
    return_free_memory()

    report = build_report(param_count, config, model_dir, options, module_stats, time.perf_counter() - started)
    if ratios is not None:
        report["allocation"] = ratios
    owners = {prefix: stats["dictionary"] for prefix, stats in module_stats.items() if "dictionary" in stats}
    qconfig = quantization_config(shapes, options.value_dtype, options.k_over_s, options.ratio, options.method,
                                  owners, options.group_size, options.allocation)
    dtype = None if options.dtype == "auto" else getattr(torch, options.dtype)
    write_checkpoint(model_dir, out_dir, part_files, qconfig, report, dtype=dtype)
    shutil.rmtree(partial, ignore_errors=True)
    return report


def materialize(module: torch.nn.Module, prefix: str, source: SafetensorsSource, device: torch.device,
                dtype: torch.dtype | None = None) -> None:
    """loading.materialize, with a missing or mis-shaped source tensor reported as a CompressError."""
    try:
        loading.materialize(module, prefix, source, device, dtype)
    except ValueError as err:
        raise CompressError(str(err)) from None


def _module_prefix(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _shapes(layer_stats: dict[str, dict]) -> dict[str, fmt.LayerShape]:
    return {p: fmt.LayerShape(s["in_features"], s["out_features"], s["k"], s["s"]) for p, s in layer_stats.items()}


def _module_stats(result, value_dtype: str, owner: str | None = None) -> dict:
    """The report entry of one module; ``owner``: the module whose dictionary it uses, if not its own."""
    shape = result.shape
    stats = {
        "k": shape.k,
        "s": shape.s,
        "structure": result.structure,
        "in_features": shape.in_features,
        "out_features": shape.out_features,
        "bytes_dense_bf16": fmt.dense_bf16_bytes(shape.in_features, shape.out_features),
        "bytes_stored": fmt.stored_bytes(shape, value_dtype, owns_dictionary=owner is None),
        "whitened_rel_error": result.whitened_rel_error,
        "unquantized_rel_error": result.unquantized_rel_error,
        "candidates": {name: round(err, 6) for name, err in result.candidates.items()},
        "damping": result.damping,
        "seconds": round(result.seconds, 3),
    }
    if owner is not None:
        stats["dictionary"] = owner
    return stats


def layer_groups(n_layers: int, group_size: int) -> list[list[int]]:
    """Consecutive decoder layers that share dictionaries: [[0, …, G−1], [G, …], …] (the last may be shorter)."""
    return [list(range(first, min(first + group_size, n_layers))) for first in range(0, n_layers, group_size)]


def _ratio(ratios: dict[str, float] | None, key: str, default: float) -> float:
    return default if ratios is None else ratios[key]


def _compress(prefix: str, device: torch.device, settings: LayerSettings, compress, *args):
    """``compress(*args)`` with running out of memory reported as a CompressError naming the module."""
    try:
        return compress(*args)
    except (torch.OutOfMemoryError, MemoryError):
        raise CompressError(
            f"out of memory compressing {prefix} on {device} (workspace "
            f"{settings.workspace_bytes / 2**30:.2f} GiB); finished layers are kept: rerun with a "
            "smaller --max-memory (GiB) or free memory, and the run resumes") from None


def _swap_in(layer: torch.nn.Module, index: int, tensors: dict[str, dict[str, torch.Tensor]], stats: dict[str, dict],
             device: torch.device) -> None:
    """Give layer ``index``'s compressed modules their reconstructed weights (Wᵀ = D·C), so later layers
    calibrate on what the compressed model really feeds them (as GPTQ does)."""
    marker = f"model.layers.{index}."
    for prefix, layer_tensors in tensors.items():
        if not prefix.startswith(marker):
            continue
        owner = stats[prefix].get("dictionary", prefix)
        layer_tensors = {**layer_tensors, fmt.DICTIONARY: tensors[owner][fmt.DICTIONARY]}
        weight_t = fmt.reconstruct_weight_t(layer_tensors, stats[prefix]["k"])
        layer.get_submodule(prefix[len(marker):]).weight.data = weight_t.T.contiguous().to(device)


def sensitivity_ratios(layers, groups: list[list[int]], layer_ids: list[int], shared: set[str], inputs,
                       source: SafetensorsSource, options: CompressOptions, device: torch.device, partial: Path,
                       log) -> dict[str, float]:
    """{unit key: ratio} for --allocation sensitivity (offline_compress.allocation), from one calibration
    pass over the original layers. Saved in the partial directory, so a resumed run does not redo it.

    A unit is a module, or one shared dictionary's group (key: its first member's prefix)."""
    saved = partial / "allocation.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    hidden = inputs.hidden
    spectra = []
    for group in tqdm(groups, desc="measuring sensitivity", unit="group", file=sys.stderr):
        members: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for index in group:
            layer = layers[index]
            materialize(layer, f"model.layers.{index}", source, device, torch.float32)
            targets = list(options.targets) if index in layer_ids else []
            grams, inputs.hidden = run_layer(layer, inputs, device, targets)
            for name in targets:
                prefix = f"model.layers.{index}.{name}"
                weight = layer.get_submodule(name).weight.detach().cpu()
                key = name if name in shared else prefix
                members.setdefault(key, []).append((prefix, weight, grams[gram_key(name)]))
            release(layer)
        for items in members.values():
            weight, gram = shared_problem([w for _, w, _ in items], [g for _, _, g in items])
            spectra.append(allocation.spectrum(items[0][0], weight, whitening_factor(gram)[0]))
        del members
        return_free_memory()
    inputs.hidden = hidden
    ratios = allocation.allocate(spectra, options.ratio, options.value_dtype)
    by_kind: dict[str, list[float]] = {}
    for key, ratio in ratios.items():
        by_kind.setdefault(key.rsplit(".", 1)[1], []).append(ratio)
    log("sensitivity allocation (mean ratio per module kind): "
        + ", ".join(f"{kind} {sum(r) / len(r):.3f}" for kind, r in by_kind.items()))
    saved.write_text(json.dumps(ratios, indent=1))
    return ratios


def differing_options(report: dict, model_dir: Path, options: CompressOptions) -> dict[str, tuple]:
    """{option: (in the report, asked for)} for every result-affecting option a finished run did differently."""
    defaults = CompressOptions().affecting()  # options a report predates were at their defaults then
    made = {**defaults, **report.get("options", {}), "model": report.get("model_dir")}
    asked = {**options.affecting(), "model": str(Path(model_dir).resolve())}
    return {k: (made.get(k), v) for k, v in asked.items() if made.get(k) != v}


def compress_or_reuse(model_dir: str | Path, out_dir: str | Path, options: CompressOptions, log=print) -> dict:
    """compress_model, unless ``out_dir`` already holds a checkpoint finished with the same model and options.

    For tools that own their output directory (the demo, the quality benchmark): a finished checkpoint
    made differently is replaced, and the log says which options differed.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    report_path = out_dir / "compress_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        differing = differing_options(report, model_dir, options)
        if not differing:
            log(f"reusing the finished checkpoint in {out_dir} (same model and options)")
            return report
        changes = ", ".join(f"{k} {made} -> {asked}" for k, (made, asked) in differing.items())
        log(f"{out_dir} was compressed differently ({changes}): compressing again")
        options = replace(options, overwrite=True)
    return compress_model(model_dir, out_dir, options, log=log)


def build_report(
    param_count: int, config: dict, model_dir: Path, options: CompressOptions, module_stats: dict, seconds: float
) -> dict:
    dense = sum(s["bytes_dense_bf16"] for s in module_stats.values())
    stored = sum(s["bytes_stored"] for s in module_stats.values())
    # Whole model: every parameter (tied embeddings once) at bf16, compressed layers at their stored bytes.
    model_dense = 2 * param_count
    compressed_params = sum(s["in_features"] * s["out_features"] for s in module_stats.values())
    model_stored = model_dense - 2 * compressed_params + stored
    errors = [s["whitened_rel_error"] for s in module_stats.values()]
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_dir": str(model_dir.resolve()),
        "options": options.affecting() | {name: getattr(options, name) for name in RUN_ONLY_OPTIONS},
        "modules": module_stats,
        "totals": {
            "modules_compressed": len(module_stats),
            "bytes_dense_bf16": dense,
            "bytes_stored": stored,
            "compression_ratio_actual": 1.0 - stored / dense if dense else 0.0,
            "model_bytes_dense_bf16": model_dense,
            "model_bytes_stored": model_stored,
            "compression_ratio_model": 1.0 - model_stored / model_dense,
            "mean_whitened_rel_error": sum(errors) / len(errors) if errors else 0.0,
            "seconds": round(seconds, 1),
        },
    }


def summary_table(report: dict) -> str:
    """Plain-text per-module-kind summary for the end of a CLI run."""
    kinds: dict[str, list[dict]] = {}
    for prefix, stats in report["modules"].items():
        kinds.setdefault(prefix.rsplit(".", 1)[1], []).append(stats)
    lines = [f"{'module':<10} {'count':>5} {'k':>6} {'s':>6} {'CR':>7} {'whitened err':>13} {'seconds':>8}"]
    for kind, items in kinds.items():
        cr = 1 - sum(i["bytes_stored"] for i in items) / sum(i["bytes_dense_bf16"] for i in items)
        err = sum(i["whitened_rel_error"] for i in items) / len(items)
        secs = sum(i["seconds"] for i in items)
        lines.append(
            f"{kind:<10} {len(items):>5} {items[0]['k']:>6} {items[0]['s']:>6} {cr:>7.3f} {err:>13.4f} {secs:>8.1f}"
        )
    t = report["totals"]
    lines.append(
        f"compressed layers: {t['bytes_dense_bf16'] / 1e6:.1f} MB bf16 -> {t['bytes_stored'] / 1e6:.1f} MB stored "
        f"(CR {t['compression_ratio_actual']:.4f}); whole model CR {t['compression_ratio_model']:.4f}; "
        f"mean whitened err {t['mean_whitened_rel_error']:.4f}; {t['seconds']:.0f} s"
    )
    return "\n".join(lines)
