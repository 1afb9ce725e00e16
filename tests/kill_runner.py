"""Run ``cospadi-compress`` and SIGKILL it at a chosen point (for the resume test).

    python -m tests.kill_runner calibration|layer|export MODEL OUT [cospadi-compress options]

calibration: while the first layer's inputs are being captured; layer: inside layer 1, after its
third module is compressed; export: right after the first output shard is written, before the
checkpoint is renamed into place.
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    point, args = sys.argv[1], sys.argv[2:]
    from offline_compress import cli, export, pipeline

    if point == "calibration":
        real_capture = pipeline.capture_layer_inputs

        def capture(*a, **k):
            real_capture(*a, **k)
            die()

        pipeline.capture_layer_inputs = capture
    elif point == "layer":
        real_compress, calls = pipeline.compress_linear, {"n": 0}

        def compress(*a, **k):
            result = real_compress(*a, **k)
            calls["n"] += 1
            if calls["n"] == 10:  # layer 1, third module
                die()
            return result

        pipeline.compress_linear = compress
    elif point == "export":
        real_save = export.save_file

        def save(*a, **k):
            real_save(*a, **k)
            die()

        export.save_file = save
    else:
        raise SystemExit(f"unknown point {point}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
