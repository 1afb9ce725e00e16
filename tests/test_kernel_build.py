"""The C++ CPU kernels' build directory survives a build that was killed part-way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from cospadi_vllm.kernels import cpu_library


def test_a_killed_build_does_not_block_the_next_load(tmp_path):
    """torch's build lock is a file whose existence is the lock, so a build killed part-way (Ctrl-C during the
    first minute of ``make setup`` or of a first ``vllm serve``) left one behind and every later process waited
    for it forever. A copy of this machine's build directory with such a file left in it must load at once."""
    cpu_library.load()  # this machine's library, built here if it is not yet
    built = cpu_library.build_directory()
    cache = tmp_path / "cache"
    copy = cache / built.relative_to(built.parent.parent)
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns(cpu_library.BUILD_LOCK, cpu_library.TORCH_BATON))
    (copy / cpu_library.TORCH_BATON).touch()  # what the killed build left
    code = ("from cospadi_vllm.kernels import cpu_library; cpu_library.load(); "
            "import torch; assert hasattr(torch.ops.cospadi_cpu, 'coef_product'); "
            "print(cpu_library.build_directory())")
    env = {**os.environ, "COSPADI_CACHE": str(cache)}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        raise AssertionError("the load waited on the stale build lock") from err
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(copy)  # it loaded the copy, not the original
    assert not (copy / cpu_library.TORCH_BATON).exists()
