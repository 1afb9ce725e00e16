"""Perplexity on fixed held-out windows (no BOS: each window is scored as raw text)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from offline_compress import assets

EVAL_WINDOWS = 16
EVAL_SEQ_LEN = 512


def evaluation_windows(tokenizer, count: int = EVAL_WINDOWS, seq_len: int = EVAL_SEQ_LEN) -> torch.Tensor:
    """[count, seq_len] non-overlapping windows spread evenly over the Wikipedia evaluation split."""
    stream = assets.tokenize_stream(tokenizer, assets.wikipedia_split("evaluation"))
    return assets.even_windows(stream, count, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all predicted positions of windows [N, T]."""
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
