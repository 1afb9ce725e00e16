"""Run ``cospadi-compress`` and SIGKILL it at a chosen point (for the resume test).

    python -m tests.kill_runner calibration|layer|export MODEL OUT [cospadi-compress options]

calibration: right after the first layer's inputs are captured; layer: inside layer 1, after its
third module is compressed; export: right after the first output shard is written, before the
checkpoint is renamed into place.
"""

from __future__ import annotations

import os
import signal
import sys


def kill_after(owner, name: str, call: int = 1) -> None:
    """Replace ``owner.name`` so that its ``call``-th call completes and then the process is SIGKILLed."""
    real, calls = getattr(owner, name), {"n": 0}

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def main() -> int:
    point, args = sys.argv[1], sys.argv[2:]
    from offline_compress import cli, export, loading, precision

    points = {
        "calibration": (loading, "capture_layer_inputs", 1),
        "layer": (precision, "compress_linear", 10),  # layer 1, third module (the pipeline compresses through precision)
        "export": (export, "save_file", 1),
    }
    if point not in points:
        raise SystemExit(f"unknown point {point} (one of {', '.join(points)})")
    kill_after(*points[point])
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
