"""Start the documented serve command in the background, wait until it answers, always stop it.

Shared by the demo, the serving benchmark and the end-to-end test so they all exercise exactly
what users run: ``cospadi-vllm serve MODEL ...`` (here as ``python -m cospadi_vllm serve``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_DEMO_CONFIG = ROOT / "serve_configs" / "cpu-demo.yaml"


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message ends with its log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model: str | Path, port: int, extra: list[str] | None = None, config: Path | None = CPU_DEMO_CONFIG) -> list[str]:
    cmd = [sys.executable, "-m", "cospadi_vllm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd + list(extra or [])


def _served_models(base_url: str) -> list[str]:
    with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
        return [m["id"] for m in json.load(response)["data"]]


@contextlib.contextmanager
def running_server(
    cmd: list[str], log_path: Path, port: int, timeout_s: float = 900, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``cmd`` (a serve command listening on 127.0.0.1:port); yield the OpenAI base URL once
    ``/v1/models`` answers. The whole process group is stopped on exit, whatever happened."""
    base_url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "w") as log, _exit_on_termination():
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                  env={**os.environ, **(env or {})})
        try:
            deadline = time.time() + timeout_s
            while True:
                if server.poll() is not None:
                    raise ServerError(f"server exited with code {server.returncode}:\n{_tail(log_path)}")
                with contextlib.suppress(OSError, ValueError):
                    if _served_models(base_url):
                        break
                if time.time() > deadline:
                    raise ServerError(f"server not healthy after {timeout_s:.0f} s:\n{_tail(log_path)}")
                time.sleep(2)
            yield base_url
        finally:
            stop(server)


@contextlib.contextmanager
def _exit_on_termination() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit(128 + signal) while a server runs, so that the finally
    clauses stop it. The server is in its own session (Ctrl-C in the terminal reaches only this
    process, which then stops it in order); without this, `kill`, a CI timeout or a closed terminal
    ended this process at once and left the server running, holding its port and memory."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def exit_now(signum, frame):
        # Once: a second signal during the shutdown would interrupt stop() and orphan the server
        # (stop() is bounded: SIGTERM, then SIGKILL after 60 s).
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    # A signal this process ignores (SIGHUP under nohup) stays ignored.
    previous = {sig: signal.signal(sig, exit_now) for sig in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]
