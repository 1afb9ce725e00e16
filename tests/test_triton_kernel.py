"""The Triton kernel tests (tests/triton_kernel_checks.py): compiled on CUDA, interpreted on CPU."""

import os
import subprocess
import sys

import torch

from cospadi_vllm.launch import ROOT

if torch.cuda.is_available():
    from tests.triton_kernel_checks import *  # noqa: F403  (the checks themselves, compiled)
else:

    def test_kernel_checks_under_the_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_kernel_checks.py"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert " passed" in run.stdout and "skipped" not in run.stdout and "failed" not in run.stdout
