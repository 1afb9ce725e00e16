"""``compress_report.json`` and the CLI's closing summary: per module and in total, what was stored."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from cospadi_vllm import format as fmt
from offline_compress.options import RUN_ONLY_OPTIONS, CompressOptions

SMALLER_THAN_ASKED = 0.005  # the summary says so when the stored CR exceeds --ratio by more than this


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory (VmHWM) over from its current size (Linux: clear_refs 5), so
    the report's peak is this run's, not an earlier one's in the same process. False where the OS refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss` (None off Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) * 1024 if line else None


def machine() -> dict:
    """The CPU a run's times come from: model name, the widest x86 vector ISA it has, threads torch used."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return {"cpu": model, "isa": isa, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def module_stats(result, owner: str | None = None) -> dict:
    """The report entry of one module (a ``layer.CompressedLinear``); ``owner``: the module whose dictionary it
    uses, if not its own."""
    shape = result.shape
    dense = fmt.dense_bf16_bytes(shape.in_features, shape.out_features)
    stored = fmt.stored_bytes(shape, result.value_dtype, owns_dictionary=owner is None,
                              dictionary_dtype_name=result.dictionary_dtype)
    stats = {
        "k": shape.k,
        "s": shape.s,
        "structure": result.structure,
        "value_dtype": result.value_dtype,
        "dictionary_dtype": result.dictionary_dtype,
        "in_features": shape.in_features,
        "out_features": shape.out_features,
        "bytes_dense_bf16": dense,
        "bytes_stored": stored,
        "compression_ratio": round(1 - stored / dense, 6),
        "whitened_rel_error": result.whitened_rel_error,
        "unquantized_rel_error": result.unquantized_rel_error,
        "candidates": {name: round(err, 6) for name, err in result.candidates.items()},
        "damping": result.damping,
        "seconds": round(result.seconds, 3),
    }
    if owner is not None:
        stats["dictionary"] = owner
    return stats


def shapes(stats: dict[str, dict]) -> dict[str, fmt.LayerShape]:
    return {p: fmt.LayerShape(s["in_features"], s["out_features"], s["k"], s["s"]) for p, s in stats.items()}


def build_report(
    param_count: int, config: dict, model_dir: Path, options: CompressOptions, stats: dict, seconds: float,
    peak_rss: int | None = None,
) -> dict:
    dense = sum(s["bytes_dense_bf16"] for s in stats.values())
    stored = sum(s["bytes_stored"] for s in stats.values())
    # Whole model: every parameter (tied embeddings once) at bf16, compressed layers at their stored bytes.
    model_dense = 2 * param_count
    compressed_params = sum(s["in_features"] * s["out_features"] for s in stats.values())
    model_stored = model_dense - 2 * compressed_params + stored
    errors = [s["whitened_rel_error"] for s in stats.values()]
    return {
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_dir": str(model_dir.resolve()),
        "options": options.affecting() | {name: getattr(options, name) for name in RUN_ONLY_OPTIONS},
        "modules": stats,
        "totals": {
            "modules_compressed": len(stats),
            "bytes_dense_bf16": dense,
            "bytes_stored": stored,
            "compression_ratio_actual": 1.0 - stored / dense if dense else 0.0,
            "model_bytes_dense_bf16": model_dense,
            "model_bytes_stored": model_stored,
            "compression_ratio_model": 1.0 - model_stored / model_dense,
            "mean_whitened_rel_error": sum(errors) / len(errors) if errors else 0.0,
            "seconds": round(seconds, 1),
            "peak_rss_bytes": peak_rss,  # this run's (a resumed run: from its restart), the whole process
        },
        "machine": machine(),
    }


def storage_types(items: list[dict], options: dict) -> str:
    """The (values / dictionary) types of these modules' report entries, with counts where they differ."""
    pairs = [f"{i.get('value_dtype', options.get('value_dtype', '?'))}/"
             f"{i.get('dictionary_dtype', options.get('dictionary_dtype', '?'))}" for i in items]
    counts = {pair: pairs.count(pair) for pair in sorted(set(pairs), key=pairs.index)}
    return next(iter(counts)) if len(counts) == 1 else ", ".join(f"{p} ×{n}" for p, n in counts.items())


def summary_table(report: dict) -> str:
    """Plain-text per-module-kind summary for the end of a CLI run."""
    kinds: dict[str, list[dict]] = {}
    for prefix, stats in report["modules"].items():
        kinds.setdefault(prefix.rsplit(".", 1)[1], []).append(stats)
    lines = [f"{'module':<10} {'count':>5} {'k':>6} {'s':>6} {'CR':>7} {'whitened err':>13} {'seconds':>8}  "
             "values/dictionary"]
    for kind, items in kinds.items():
        cr = 1 - sum(i["bytes_stored"] for i in items) / sum(i["bytes_dense_bf16"] for i in items)
        err = sum(i["whitened_rel_error"] for i in items) / len(items)
        secs = sum(i["seconds"] for i in items)
        lines.append(
            f"{kind:<10} {len(items):>5} {items[0]['k']:>6} {items[0]['s']:>6} {cr:>7.3f} {err:>13.4f} {secs:>8.1f}  "
            + storage_types(items, report["options"])
        )
    t = report["totals"]
    lines.append(
        f"compressed layers: {t['bytes_dense_bf16'] / 1e6:.1f} MB bf16 -> {t['bytes_stored'] / 1e6:.1f} MB stored "
        f"(CR {t['compression_ratio_actual']:.4f}); whole model CR {t['compression_ratio_model']:.4f}; "
        f"mean whitened err {t['mean_whitened_rel_error']:.4f}; {t['seconds']:.0f} s"
        + (f", peak RSS {t['peak_rss_bytes'] / 2**30:.2f} GiB" if t.get("peak_rss_bytes") else "")
        + (f" ({report['machine']['isa']}, {report['machine']['threads']} threads)" if "machine" in report else "")
    )
    asked = report["options"]["ratio"]
    if t["compression_ratio_actual"] > asked + SMALLER_THAN_ASKED:
        full = [p for p, s in report["modules"].items() if s["k"] == s["s"] == min(s["in_features"], s["out_features"])]
        lines.append(f"smaller than asked: CR {t['compression_ratio_actual']:.4f} for --ratio {asked}: {len(full)} "
                     "modules store full-rank s = k, which fits in fewer bytes than their budget with a lower error")
    return "\n".join(lines)
