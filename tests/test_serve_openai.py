"""End to end: the documented serve command on 127.0.0.1, queried with the official openai client."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from cospadi_vllm.launch import ROOT, free_port, running_server, serve_command
from tests.vllm_helpers import run_vllm


@pytest.fixture(scope="module")
def checkpoint(tiny_models, calib_file, tmp_path_factory) -> Path:
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_model

    out = tmp_path_factory.mktemp("serve") / "llama-cospadi"
    compress_model(tiny_models["llama"], out, CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4,
                                                              seq_len=64), log=lambda m: None)
    return out


@pytest.mark.slow
def test_serve_answers_openai_completions_and_chat(checkpoint, tmp_path):
    port = free_port()
    cmd = serve_command(checkpoint, port, ["--max-model-len", "512", "--served-model-name", "cospadi"])
    with running_server(cmd, tmp_path / "server.log", port, timeout_s=600, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["cospadi"]
        prompt = "The history of the city begins in"
        completion = client.completions.create(model="cospadi", prompt=prompt, max_tokens=8, temperature=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(model="cospadi", messages=messages, max_tokens=8, temperature=0)
        # Busy port: the same command fails at once with a clear message.
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert busy.returncode == 2 and f":{port} is already in use" in busy.stderr
    with pytest.raises(OSError):  # the server was stopped: nothing answers on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    offline = run_vllm(checkpoint, prompts=[prompt, chat_prompt], max_tokens=8)
    assert completion.choices[0].text == offline["texts"][0]
    assert chat.choices[0].message.content == offline["texts"][1]
    assert len(completion.choices[0].text) > 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminating_the_launcher_stops_its_server(checkpoint, tmp_path, sig):
    """`kill`, a CI timeout or a closed terminal ends the process that started the server: the server
    (in its own session, so the signal does not reach it) must stop with it and free its port."""
    port = free_port()
    runner = subprocess.Popen([sys.executable, "-m", "tests.serve_runner", str(checkpoint), str(port),
                               str(tmp_path / "server.log")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server_processes = ["pgrep", "-f", "--", f"--port {port}"]
    try:
        assert runner.stdout.readline().strip() == "serving", (tmp_path / "server.log").read_text()[-3000:]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it answers
        runner.send_signal(sig)
        time.sleep(0.5)
        runner.send_signal(sig)  # a second one while it stops the server (ignored until the server is gone)
        returncode = runner.wait(timeout=120)
        left = subprocess.run(server_processes, capture_output=True, text=True).stdout.split()
        assert left == [], f"server processes still running after the launcher exited: {left}"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        # Exits as a terminated process once the server is gone: 128 + signal from the handler, or
        # killed by the second signal if that came after the cleanup had restored the default handler.
        assert returncode in (128 + sig, -sig)
    finally:
        if runner.poll() is None:
            runner.kill()
        # Nothing left behind if it failed: the server's whole process group (its engine core and worker
        # are named VLLM::…, so only the API server's command line carries the port).
        for pid in subprocess.run(server_processes, capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)


def test_bf16_serving_on_a_cpu_without_bf16_warns(tmp_path, monkeypatch):
    """`cospadi-vllm serve` warns in one line when it would serve bf16 (asked for, or the checkpoint's own
    dtype under auto) on a CPU without bf16 matrix instructions; float32 (the demo config) does not."""
    from cospadi_vllm import cli
    from cospadi_vllm.kernels import cpu_library

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"dtype": "bfloat16"}')
    config = ROOT / "serve_configs" / "cpu-demo.yaml"
    monkeypatch.setattr(cpu_library, "has_bf16_matmul", lambda: False)
    for argv in (["serve", str(model), "--dtype", "bfloat16"], ["serve", str(model), "--dtype=bfloat16"],
                 ["serve", str(model)]):
        warning = cli._bf16_on_cpu_warning(argv)
        assert warning and warning.startswith("cospadi-vllm: warning: this CPU has no bf16 matrix instructions")
        assert "\n" not in warning and "--dtype float32" in warning
    for argv in (["serve", str(model), "--config", str(config)], ["serve", str(model), "--dtype", "float32"]):
        assert cli._bf16_on_cpu_warning(argv) is None
    monkeypatch.setattr(cpu_library, "has_bf16_matmul", lambda: True)
    assert cli._bf16_on_cpu_warning(["serve", str(model), "--dtype", "bfloat16"]) is None
