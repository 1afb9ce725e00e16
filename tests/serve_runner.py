"""Serve CHECKPOINT on 127.0.0.1:PORT through ``cospadi_vllm.launch.running_server`` and wait there
(for the test that terminates this process and checks that the server went with it).

    python -m tests.serve_runner CHECKPOINT PORT LOG
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cospadi_vllm.launch import running_server, serve_command


def main() -> int:
    checkpoint, port, log = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    cmd = serve_command(checkpoint, port, ["--max-model-len", "512"])
    with running_server(cmd, log, port, timeout_s=600, env={"VLLM_CPU_KVCACHE_SPACE": "1"}):
        print("serving", flush=True)
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
