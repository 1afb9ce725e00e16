"""Are two versions of the compressor byte-identical? Build a fixed set of checkpoints, compare two sets.

    # the checkpoints of an older revision, built by that revision's own code
    git worktree add /tmp/base REV && (cd /tmp/base && python benchmarks/same_checkpoints.py build /tmp/ckpt-base)
    # the same with this checkout, then every tensor and config.json compared
    python benchmarks/same_checkpoints.py build /tmp/ckpt-new [--smollm2]
    python benchmarks/same_checkpoints.py compare /tmp/ckpt-base /tmp/ckpt-new

The set: tiny random Llama / Qwen2 / Qwen3 (fixed seeds) compressed with the default search, with
``--method svd-llm``, with ``--group-size 2`` and with ``--allocation sensitivity``; ``--smollm2`` adds
the real SmolLM2-135M at ``--ratio 0.3`` with default settings (~4 min on 2 cores). ``compare`` checks
every tensor's dtype, shape and bytes, config.json exactly, and compress_report.json without its
timings; it prints one line per difference and exits 1 if there is any. Results go to
``benchmarks/results/same-checkpoints.json`` with ``--record``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_VARIANTS = {
    "default": {},
    "svd-llm": {"method": "svd-llm"},
    "grouped": {"group_size": 2},
    "sensitivity": {"allocation": "sensitivity"},
}
TIMING_KEYS = {"seconds", "model_dir", "checkpoint_bytes"}


def build(out: Path, smollm2: bool) -> None:
    from offline_compress import assets
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_model
    from tests.conftest import TINY_ARCHS, make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib.txt"
    calib.write_text(assets.wikipedia_split("calibration")[:60_000])
    for seed, arch in enumerate(TINY_ARCHS):
        model = out / "models" / arch
        if not model.is_dir():
            make_tiny_model(arch, model, seed=seed)
        for variant, extra in TINY_VARIANTS.items():
            target = out / f"{arch}-{variant}"
            if not target.is_dir():
                options = CompressOptions(iterations=2, calib=str(calib), calib_samples=4, seq_len=64, **extra)
                compress_model(model, target, options, log=lambda m: None)
            print(f"built {target}", flush=True)
    if smollm2:
        target = out / "smollm2-cr0.3"
        if not target.is_dir():
            compress_model(assets.smollm2_dir(), target, CompressOptions(ratio=0.3), log=print)
        print(f"built {target}", flush=True)


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _read_json(path: Path, root: Path):
    """A JSON file with the set's own root directory (calibration file, model paths) written as <root>."""
    return json.loads(path.read_text().replace(str(root), "<root>"))


def compare_checkpoint(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, differences) between two checkpoint directories."""
    import torch
    from safetensors import safe_open

    differences = []
    for name in ("config.json", "compress_report.json"):
        left, right = (_read_json(d / name, d.parent) for d in (a, b))
        if name == "compress_report.json":
            left, right = _without_timings(left), _without_timings(right)
        if left != right:
            differences.append(f"{b.name}/{name} differs")
    tensors = {}
    for side, directory in (("a", a), ("b", b)):
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    tensors.setdefault(key, {})[side] = fh.get_tensor(key)
    for key, pair in sorted(tensors.items()):
        if set(pair) != {"a", "b"}:
            differences.append(f"{b.name}: tensor {key} only in {a.name if 'a' in pair else b.name}")
            continue
        x, y = pair["a"], pair["b"]
        if x.dtype != y.dtype or x.shape != y.shape:
            differences.append(f"{b.name}: tensor {key} {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
            differences.append(f"{b.name}: tensor {key} has other bytes")
    return len(tensors), differences


def compare(a_root: Path, b_root: Path, record: bool) -> int:
    names = sorted(p.name for p in a_root.iterdir() if (p / "config.json").is_file() and "quantization_config"
                   in (p / "config.json").read_text())
    rows, all_differences = [], []
    for name in names:
        if not (b_root / name).is_dir():
            all_differences.append(f"{name}: missing in {b_root}")
            continue
        count, differences = compare_checkpoint(a_root / name, b_root / name)
        rows.append({"checkpoint": name, "tensors": count, "identical": not differences})
        all_differences += differences
        print(f"{name}: {count} tensors, {'identical' if not differences else f'{len(differences)} differences'}")
    for line in all_differences:
        print(line)
    if record:
        path = ROOT / "benchmarks" / "results" / "same-checkpoints.json"
        path.write_text(json.dumps({"a": str(a_root), "b": str(b_root), "checkpoints": rows,
                                    "differences": all_differences}, indent=1))
    return 1 if all_differences or not rows else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the checkpoint set with this checkout's code")
    b.add_argument("out", type=Path)
    b.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M at --ratio 0.3, defaults (~4 min)")
    c = sub.add_parser("compare", help="compare two built sets tensor by tensor")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--record", action="store_true", help="write benchmarks/results/same-checkpoints.json")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, args.smollm2)
        return 0
    return compare(args.a, args.b, args.record)


if __name__ == "__main__":
    sys.exit(main())
