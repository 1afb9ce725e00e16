"""What a compression run is asked to do: every option once, with its command-line flag, help and check.

``cospadi-compress``'s parser is built from :class:`CompressOptions` (``cli.build_parser``): a field's
metadata holds its flag and help, so an option is defined here and nowhere else.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from cospadi_vllm import format as fmt
from offline_compress.calibration import gram_key

METHODS = ("cospadi", "svd-llm")
DEFAULT_K_OVER_S = (1.5, 2.0)  # k/s = 3 never won on SmolLM2 (benchmarks/results/NOTES.md item 12)
# What the compressor writes unless told (a checkpoint without the field is read as format's bfloat16): at the same
# bytes an int8 dictionary buys more atoms and non-zeros, SmolLM2 perplexity 33.05 / 43.14 / 61.03 → 20.53 /
# 20.58 / 22.23 at CR 0.2 / 0.3 / 0.4 (benchmarks/results/quality-smollm2.md, NOTES items 53–54, 72).
DEFAULT_DICTIONARY_DTYPE = "int8"
# Linears compressed by default, by their name inside a decoder layer.
DEFAULT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The projections the paper shares across layers (its appendix; Basis Sharing shares the same ones and
# keeps o_proj and down_proj per layer).
DEFAULT_GROUP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ALLOCATIONS = ("uniform", "sensitivity")
BUILTIN_CALIBRATION = "wikipedia"
CHAT_CALIBRATION = "wikipedia-chat"  # the same split as chat exchanges in the model's own chat template
DTYPES = ("auto", "bfloat16", "float16", "float32")
AUTO = "auto"  # --value-dtype / --dictionary-dtype: chosen per vLLM layer by the precision search (``precision``)
# Where the work runs: changes how fast, not what is computed (a resumed run may change them).
RUN_ONLY_OPTIONS = ("device", "batch_size", "max_memory_gb")


class CompressError(Exception):
    """A user-caused problem: bad path, bad option, bad model or data. One line, names the thing."""


def option(default, help: str, flag: str | None = None, cli: bool = True, **argparse_kwargs):
    """A dataclass field with its command-line flag (default: --the-name) and argparse settings."""
    metadata = {"help": help, "flag": flag, "cli": cli, "argparse": argparse_kwargs}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class CompressOptions:
    ratio: float = option(0.3, "target compression ratio of the compressed layers, on real stored bytes vs bf16")
    method: str = option("cospadi", "cospadi = sparse dictionary learning; svd-llm = whitened truncated SVD baseline",
                         choices=METHODS)
    k_over_s: tuple[float, ...] = option(
        DEFAULT_K_OVER_S, "atoms per non-zero (k/s) of the learned dictionary. Several comma-separated values: per "
        "module, a short trial of each picks the structure, and the closed-form ones (SVD-LLM's dense s = k, an "
        "orthogonal dictionary) are kept where better after quantization; one value forces that structure everywhere",
        kind="floats")
    fast: bool = option(False, "closed-form structures only: per module the better of SVD-LLM's s = k and an orthogonal "
                        "dictionary (exact sparse coding, Procrustes updates), no learned k/s trials (--k-over-s is not "
                        "used); several times faster, somewhat higher error on square layers", kind="flag")
    value_dtype: str = option(fmt.DEFAULT_VALUE_DTYPE, "storage type of the coefficient values (int4: two per byte; "
                              f"{AUTO}: per vLLM layer the better of int8 and int4 at the same bytes, see "
                              "--dictionary-dtype)", choices=(*sorted(fmt.VALUE_DTYPES), AUTO))
    dictionary_dtype: str = option(DEFAULT_DICTIONARY_DTYPE, "storage type of the dictionary (int8: one scale per "
                                   "atom, int4: GPTQ-rounded groups of 128 inputs; a smaller dictionary buys more "
                                   "atoms and non-zeros at the same --ratio; bfloat16: the float dictionary; "
                                   f"{AUTO}: per vLLM layer (q/k/v, o, gate/up, down) the type pair with the lowest "
                                   "error after quantization on the closed-form structures, then the structure search "
                                   "at that pair)",
                                   choices=(*sorted(n for n, t in fmt.DICTIONARY_TYPES.items() if t.supported), AUTO))
    iterations: int = option(8, "dictionary-learning iterations T (each: dictionary update + sparse coding)")
    calib: str = option(BUILTIN_CALIBRATION,
                        f"calibration text: '{BUILTIN_CALIBRATION}' (built-in split), '{CHAT_CALIBRATION}' (the same "
                        "split as chat exchanges in the model's chat template; for chat models), a .txt file or a "
                        ".jsonl of {\"text\": ...}")
    calib_samples: int = option(32, "calibration sequences")
    seq_len: int = option(512, "tokens per calibration sequence")
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "comma-separated linears to compress, from: "
                                      + ",".join(DEFAULT_TARGETS), kind="names")
    device: str = option("cpu", "cpu or cuda[:N]")
    seed: int = option(0, "random seed (atom replacement, calibration windows)")
    sequential: bool = option(True, "calibrate every layer on the original model's activations instead of on the "
                              "outputs of the already-compressed layers (the default, sequential)", flag="--one-shot",
                              kind="negated")
    batch_size: int = option(8, "calibration batch size")
    dtype: str = option("auto", "dtype of the uncompressed tensors in the checkpoint (auto = as in the source)",
                        choices=DTYPES)
    overwrite: bool = option(False, "replace OUT_DIR if it exists", kind="flag")
    max_memory_gb: float | None = option(
        None, "memory budget of the sparse-coding workspace in GiB (columns are coded in chunks that fit it); "
        "default: a quarter of the free RAM / GPU memory, at most 1 GiB", flag="--max-memory", metavar="GIB")
    group_size: int = option(1, "cross-layer dictionary sharing: every G consecutive layers share one dictionary per "
                             "--group-targets projection (stored once), each layer keeping its own sparse "
                             "coefficients; 1 = a dictionary per layer", metavar="G")
    group_targets: tuple[str, ...] = option(
        DEFAULT_GROUP_TARGETS, "projections whose dictionaries are shared when --group-size > 1 (q/k/v and gate/up "
        "go together: vLLM fuses them into one layer)", kind="names")
    allocation: str = option("uniform", "uniform = every module at --ratio; sensitivity = per-module ratios with the "
                             "same total bytes, more where the whitened spectrum says bytes lower the error most (one "
                             "extra calibration pass; measured to help with a bfloat16 dictionary, to hurt with the "
                             "default int8 one)", choices=ALLOCATIONS)
    layers: list[int] | None = option(None, "restrict to these decoder layers (tests, debugging)", cli=False)

    @property
    def learned_k_over_s(self) -> tuple[float, ...]:
        """The k/s of the learned structures tried per module (none with --fast)."""
        return () if self.fast else tuple(self.k_over_s)

    def affecting(self) -> dict:
        """The options that change the checkpoint, JSON-normalised (tuples as lists) to compare with a report.

        Where the work runs (device, batch size, memory budget) does not change what is computed.
        """
        options = {k: v for k, v in asdict(self).items() if k not in ("overwrite", *RUN_ONLY_OPTIONS)}
        return json.loads(json.dumps(options, default=str))


def cli_fields():
    """(field, flag, metadata) of every option the command line sets, in declaration order."""
    for f in fields(CompressOptions):
        if f.metadata["cli"]:
            yield f, f.metadata["flag"] or "--" + f.name.replace("_", "-"), f.metadata


def workspace_bytes(max_memory_gb: float | None, device: torch.device) -> int:
    """Sparse-coding workspace budget: the user's --max-memory, else a quarter of what is free (≤ 1 GiB)."""
    if max_memory_gb is not None:
        return int(max_memory_gb * 1024**3)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(free // 4, 1024**3))


def validate_options(options: CompressOptions) -> torch.device:
    """Check every option on its own (before any file is read); return the device to run on."""
    if not 0.0 < options.ratio < 1.0:
        raise CompressError(f"--ratio must be in (0, 1), got {options.ratio}")
    if not options.k_over_s or any(not v >= 1.0 for v in options.k_over_s):
        raise CompressError(f"--k-over-s values must be >= 1, got {','.join(map(str, options.k_over_s)) or '(none)'}")
    if options.max_memory_gb is not None and not options.max_memory_gb > 0:
        raise CompressError(f"--max-memory must be > 0 GiB, got {options.max_memory_gb}")
    if options.method not in METHODS:
        raise CompressError(f"--method must be one of {METHODS}, got {options.method!r}")
    if options.value_dtype not in (*fmt.VALUE_DTYPES, AUTO):
        raise CompressError(f"--value-dtype must be one of {[*sorted(fmt.VALUE_DTYPES), AUTO]}, got {options.value_dtype!r}")
    served = [*sorted(name for name, t in fmt.DICTIONARY_TYPES.items() if t.supported), AUTO]
    if options.dictionary_dtype not in served:  # a reserved dtype would write a checkpoint nothing serves
        raise CompressError(f"--dictionary-dtype must be one of {served}, got {options.dictionary_dtype!r}")
    _validate_precision_search(options)
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
        _validate_group_targets(options)
    if options.allocation not in ALLOCATIONS:
        raise CompressError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {options.allocation!r}")
    device = _device(options.device)
    if options.dtype not in DTYPES:
        raise CompressError(f"--dtype must be auto, bfloat16, float16 or float32, got {options.dtype!r}")
    return device


def _validate_precision_search(options: CompressOptions) -> None:
    """``auto`` storage types are chosen per vLLM layer by the CoSpaDi search at that layer's own budget."""
    if AUTO not in (options.value_dtype, options.dictionary_dtype):
        return
    flag = "--value-dtype" if options.value_dtype == AUTO else "--dictionary-dtype"
    if options.method != "cospadi":
        raise CompressError(f"{flag} {AUTO} needs --method cospadi (svd-llm is the baseline as published)")
    if options.group_size > 1:
        raise CompressError(f"{flag} {AUTO} does not support --group-size > 1 yet: pass the storage types")
    if options.allocation != "uniform":
        raise CompressError(f"{flag} {AUTO} does not support --allocation {options.allocation} yet (its budgets "
                            "are computed for one pair of storage types): pass the storage types")


def _validate_group_targets(options: CompressOptions) -> None:
    outside = [t for t in options.group_targets if t not in options.targets]
    if outside or not options.group_targets:
        raise CompressError(f"--group-targets {outside or '(empty)'} not among --targets {','.join(options.targets)}")
    for target in options.group_targets:  # vLLM fuses the linears that read one input into one layer
        fused = [t for t in options.targets if gram_key(t) == gram_key(target)]
        if not set(fused) <= set(options.group_targets):
            raise CompressError(
                f"--group-targets has {target} but not {','.join(t for t in fused if t not in options.group_targets)}"
                f": vLLM fuses {','.join(fused)} into one layer, so they share dictionaries together or not at all")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CompressError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise CompressError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressError(f"--device {name} requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CompressError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
