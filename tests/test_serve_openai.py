"""End to end: the documented serve command on 127.0.0.1, queried with the official openai client."""

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

from tests.vllm_helpers import ROOT, run_vllm

SERVE = [sys.executable, "-m", "cospadi_vllm", "serve"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_models, calib_file, tmp_path_factory) -> Path:
    from offline_compress.pipeline import CompressOptions, compress_model

    out = tmp_path_factory.mktemp("serve") / "llama-cospadi"
    compress_model(tiny_models["llama"], out, CompressOptions(iterations=1, calib=str(calib_file), calib_samples=4,
                                                              seq_len=64), log=lambda m: None)
    return out


@pytest.mark.slow
def test_serve_answers_openai_completions_and_chat(checkpoint, tmp_path):
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    cmd = SERVE + [str(checkpoint), "--config", str(ROOT / "serve_configs" / "cpu-demo.yaml"), "--port", str(port),
                   "--max-model-len", "512", "--served-model-name", "cospadi"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if [m.id for m in client.models.list().data] == ["cospadi"]:
                    break
            except Exception:
                pass
            assert time.time() < deadline, "server did not become healthy in 600 s"
            time.sleep(2)
        prompt = "The history of the city begins in"
        completion = client.completions.create(model="cospadi", prompt=prompt, max_tokens=8, temperature=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(model="cospadi", messages=messages, max_tokens=8, temperature=0)
        # Busy port: the same command fails at once with a clear message.
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert busy.returncode == 2 and f":{port} is already in use" in busy.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    assert server.poll() is not None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    offline = run_vllm(checkpoint, prompts=[prompt, chat_prompt], max_tokens=8)
    assert completion.choices[0].text == offline["texts"][0]
    assert chat.choices[0].message.content == offline["texts"][1]
    assert len(completion.choices[0].text) > 0
