"""Calibration text → token windows: the built-in Wikipedia split (plain or as chat), or the user's file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from offline_compress import assets
from offline_compress.options import BUILTIN_CALIBRATION, CHAT_CALIBRATION, CompressError, CompressOptions

CHAT_CHUNK_CHARS = 1200  # one exchange per ~410 tokens on SmolLM2: every 512-token window holds a turn boundary


def chat_calibration_text(tokenizer, text: str) -> str:
    """``text`` as a run of chat exchanges rendered with the tokenizer's chat template.

    Paragraphs are grouped into chunks of about CHAT_CHUNK_CHARS; in each chunk the first paragraph
    is the user's turn and the rest the assistant's; a trailing chunk shorter than that is dropped.
    Plain-text calibration never shows the model its turn markers, so whitening neglects the
    directions the first answer token depends on (a CR 0.3 checkpoint calibrated on plain Wikipedia
    answered chat questions with an empty string).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CompressError(f"--calib {CHAT_CALIBRATION} needs a tokenizer with a chat template; this one has none")
    chunks, current = [], []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if paragraph:
            current.append(paragraph)
        if current and sum(len(p) for p in current) >= CHAT_CHUNK_CHARS:
            chunks.append(current)
            current = []
    exchanges = []
    for chunk in chunks:
        if len(chunk) < 2:  # one long paragraph: the user's turn is its first sentence
            head, _, tail = chunk[0].partition(". ")
            chunk = [head + ".", tail]
        messages = [{"role": "user", "content": chunk[0]}, {"role": "assistant", "content": "\n\n".join(chunk[1:])}]
        exchanges.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return "".join(exchanges)


def jsonl_text(path: Path) -> str:
    """The "text" fields (or bare strings) of a .jsonl file, one per line, joined as paragraphs."""
    texts = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise CompressError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
        text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise CompressError(f"{path}:{lineno} has no string 'text' field")
        texts.append(text)
    return "\n\n".join(texts)


def calibration_text(calib: str, tokenizer=None) -> str:
    """Text from the built-in Wikipedia split (plain or as chat exchanges, which needs the tokenizer),
    a .txt file, or a .jsonl file of {"text": ...}."""
    if calib == BUILTIN_CALIBRATION:
        return assets.wikipedia_split("calibration")
    if calib == CHAT_CALIBRATION:
        return chat_calibration_text(tokenizer, assets.wikipedia_split("calibration"))
    path = Path(calib)
    if not path.is_file():
        raise CompressError(f"calibration file {path} does not exist")
    return jsonl_text(path) if path.suffix == ".jsonl" else path.read_text()


def calibration_ids(tokenizer, options: CompressOptions) -> torch.Tensor:
    """[calib_samples, seq_len] token ids: random windows of the calibration text (seeded)."""
    stream = assets.tokenize_stream(tokenizer, calibration_text(options.calib, tokenizer))
    if stream.numel() < options.seq_len:
        raise CompressError(
            f"calibration text has {stream.numel()} tokens, fewer than one sequence of --seq-len {options.seq_len}"
        )
    return assets.random_windows(stream, options.calib_samples, options.seq_len, options.seed)
