"""Every CPU kernel build on this machine: the CPU kernel tests (tests/test_cpu_kernels.py, against float64)
run again in a child process with the library compiled for x86-64-v3 (AVX2 + FMA: what machines without
AVX-512 get) and for plain x86-64 (the portable bit walk alone), whatever CPU CI runs on."""

import os
import subprocess
import sys

import pytest

from cospadi_vllm.launch import ROOT

FLAGS = open("/proc/cpuinfo").read().split()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_cpu_kernels_built_for(arch):
    if arch == "x86-64-v3" and not all(f in FLAGS for f in ("avx2", "fma", "bmi2")):
        pytest.skip("this CPU cannot run x86-64-v3 code")
    env = {**os.environ, "COSPADI_CPU_ARCH": arch, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cpu_kernels.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
