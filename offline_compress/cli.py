"""``cospadi-compress MODEL_DIR OUT_DIR`` — command-line front end of compress_model."""

from __future__ import annotations

import argparse
import sys

from cospadi_vllm import format as fmt
from offline_compress.calibration import DEFAULT_TARGETS
from offline_compress.layer import METHODS
from offline_compress.pipeline import (
    ALLOCATIONS,
    BUILTIN_CALIBRATION,
    CHAT_CALIBRATION,
    CompressError,
    CompressOptions,
    compress_model,
    summary_table,
)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    defaults = CompressOptions()
    parser = argparse.ArgumentParser(
        prog="cospadi-compress",
        description="Compress the linear layers of a Hugging Face Llama/Qwen model into a CoSpaDi "
        "checkpoint (dictionary + column-sparse quantized coefficients) that vLLM serves with the "
        "cospadi_vllm plugin.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model_dir", help="Hugging Face model directory (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="where to write the checkpoint (must not exist unless --overwrite)")
    parser.add_argument("--ratio", type=float, default=defaults.ratio,
                        help="target compression ratio of the compressed layers, on real stored bytes vs bf16")
    parser.add_argument("--method", choices=METHODS, default=defaults.method,
                        help="cospadi = K-SVD sparse dictionary; svd-llm = whitened truncated SVD baseline")
    parser.add_argument("--k-over-s", type=_float_list, default=",".join(f"{v:g}" for v in defaults.k_over_s),
                        help="atoms per non-zero (k/s). Several comma-separated values: per module, a short trial of "
                        "each picks the structure, and the dense s = k structure (SVD-LLM's) is kept where it is "
                        "better after quantization; one value forces that structure everywhere")
    parser.add_argument("--value-dtype", choices=sorted(fmt.VALUE_DTYPES), default=defaults.value_dtype,
                        help="storage type of the coefficient values")
    parser.add_argument("--iterations", type=int, default=defaults.iterations,
                        help="dictionary-learning iterations T (each: dictionary update + sparse coding)")
    parser.add_argument("--calib", default=defaults.calib,
                        help=f"calibration text: '{BUILTIN_CALIBRATION}' (built-in split), '{CHAT_CALIBRATION}' (the same "
                        "split as chat exchanges in the model's chat template; for chat models), a .txt file or a "
                        ".jsonl of {\"text\": ...}")
    parser.add_argument("--calib-samples", type=int, default=defaults.calib_samples, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per calibration sequence")
    parser.add_argument("--targets", default=",".join(defaults.targets),
                        help=f"comma-separated linears to compress, from: {','.join(DEFAULT_TARGETS)}")
    parser.add_argument("--group-size", type=int, default=defaults.group_size, metavar="G",
                        help="cross-layer dictionary sharing: every G consecutive layers share one dictionary per "
                        "--group-targets projection (stored once), each layer keeping its own sparse coefficients; "
                        "1 = a dictionary per layer")
    parser.add_argument("--group-targets", default=",".join(defaults.group_targets),
                        help="projections whose dictionaries are shared when --group-size > 1 (q/k/v and gate/up "
                        "go together: vLLM fuses them into one layer)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default=defaults.allocation,
                        help="uniform = every module at --ratio; sensitivity = per-module ratios with the same total "
                        "bytes, more where the whitened spectrum says bytes lower the error most (one extra "
                        "calibration pass)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda[:N]")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB", dest="max_memory_gb",
                        help="memory budget of the sparse-coding workspace in GiB (columns are coded in chunks that "
                        "fit it); default: a quarter of the free RAM / GPU memory, at most 1 GiB")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--one-shot", action="store_true",
                        help="calibrate every layer on the original model's activations instead of on the "
                        "outputs of the already-compressed layers (the default, sequential)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="calibration batch size")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "bfloat16", "float16", "float32"],
                        help="dtype of the uncompressed tensors in the checkpoint (auto = as in the source)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = CompressOptions(
        ratio=args.ratio,
        method=args.method,
        k_over_s=args.k_over_s,
        value_dtype=args.value_dtype,
        iterations=args.iterations,
        calib=args.calib,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        targets=_names(args.targets),
        group_size=args.group_size,
        group_targets=_names(args.group_targets),
        allocation=args.allocation,
        device=args.device,
        max_memory_gb=args.max_memory_gb,
        seed=args.seed,
        sequential=not args.one_shot,
        batch_size=args.batch_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    try:
        report = compress_model(args.model_dir, args.out_dir, options, log=lambda m: print(m, file=sys.stderr))
    except (CompressError, fmt.FormatError) as err:
        print(f"cospadi-compress: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cospadi-compress: interrupted; finished layers are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(summary_table(report))
    print(f"wrote {args.out_dir} (report: {args.out_dir}/compress_report.json)")
    return 0
