"""``cospadi-compress MODEL_DIR OUT_DIR`` — command-line front end of compress_model.

Every option comes from ``options.CompressOptions`` (its flag, help and default are declared there).
"""

from __future__ import annotations

import argparse
import sys

from cospadi_vllm import format as fmt
from offline_compress.budget import BudgetError
from offline_compress.options import CompressError, CompressOptions, cli_fields
from offline_compress.pipeline import compress_model
from offline_compress.report import summary_table


def _floats(text: str) -> tuple[float, ...]:
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
    for f, flag, metadata in cli_fields():
        kwargs = dict(metadata["argparse"])
        kind = kwargs.pop("kind", None)
        default = getattr(defaults, f.name)
        if kind in ("flag", "negated"):  # a switch: --overwrite sets True, --one-shot sets sequential False
            parser.add_argument(flag, dest=f.name, action="store_false" if kind == "negated" else "store_true",
                                help=metadata["help"], **kwargs)
            continue
        if kind in ("floats", "names"):  # comma-separated on the command line, a tuple in the options
            kwargs["type"] = _floats if kind == "floats" else _names
            default = ",".join(f"{v:g}" if kind == "floats" else v for v in default)
        elif default is not None and "choices" not in kwargs:
            kwargs["type"] = type(default)
        elif default is None:
            kwargs["type"] = float
        parser.add_argument(flag, dest=f.name, default=default, help=metadata["help"], **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    model_dir, out_dir = args.pop("model_dir"), args.pop("out_dir")
    options = CompressOptions(**args)
    try:
        report = compress_model(model_dir, out_dir, options, log=lambda m: print(m, file=sys.stderr))
    except (CompressError, BudgetError, fmt.FormatError) as err:
        print(f"cospadi-compress: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cospadi-compress: interrupted; finished layers are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(summary_table(report))
    print(f"wrote {out_dir} (report: {out_dir}/compress_report.json)")
    return 0
