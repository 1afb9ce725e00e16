"""The built-in calibration sources: plain Wikipedia and the same split as chat exchanges."""

import re

from transformers import AutoTokenizer

from offline_compress import assets
from offline_compress.calibration_text import calibration_ids, calibration_text
from offline_compress.options import CompressOptions


def test_chat_calibration_is_the_wikipedia_split_in_the_chat_template(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    plain = calibration_text("wikipedia")
    chat = calibration_text("wikipedia-chat", tokenizer)
    turns = re.findall(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>", chat, flags=re.S)
    roles = [role for role, _ in turns]
    assert len(roles) > 1000 and roles[:3] == ["system", "user", "assistant"]
    assert roles == ["system", "user", "assistant"] * (len(roles) // 3)
    # Every user/assistant turn is Wikipedia text of the calibration split, in order, nothing invented
    # (the only edit: a single-paragraph chunk is split after its first sentence, keeping ". ").
    position = 0
    for role, content in turns:
        if role == "system":
            continue
        for piece in content.split("\n\n"):
            found = plain.find(piece.strip().rstrip("."), position)
            assert found >= 0, piece[:80]
            position = found
    assert position > 0.9 * len(plain)


def test_chat_calibration_windows_hold_turn_boundaries(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    windows = calibration_ids(tokenizer, CompressOptions(calib="wikipedia-chat", calib_samples=16, seq_len=512))
    assistant_start = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert windows.shape == (16, 512)
    for window in windows.tolist():
        starts = [i for i in range(len(window) - len(assistant_start)) if window[i : i + len(assistant_start)] == assistant_start]
        assert starts, "a 512-token calibration window without an assistant turn"
    assert assets.wikipedia_split("evaluation")[:200] not in calibration_text("wikipedia-chat", tokenizer)
