"""Model-level greedy decode, dense vs CoSpaDi, in transformers with the plugin's kernels (no vLLM).

vLLM's CUDA wheels cannot be installed on the GPU machines here, so this measures end-to-end decode
with a minimal greedy loop over the Hugging Face model: a static KV cache, the prompt prefilled once,
then every decode step (B new tokens) replayed as one CUDA graph whose inputs (token ids, cache
position) live in static buffers and whose greedy argmax feeds the next step. tokens/s = B × steps /
time of the replays (CUDA events).

Models (random weights, built from the configs below on the GPU; nothing has to be carried there):
  smollm2-135m   SmolLM2-135M's config (30 layers, hidden 576); ``--smollm2 DIR`` loads the real weights
                 from a local HF directory instead (e.g. ``offline_compress.assets.smollm2_dir()``)
  llama3-8b-4l   Llama-3-8B's layer shapes and vocabulary, 4 of its 32 layers (the step time of the
                 full model is about 8× the linear layers' part of this one, plus the same lm_head)

CoSpaDi variants: every q/k/v/o/gate/up/down ``nn.Linear`` becomes the transformers integration's
``CoSpaDiLinear`` (cospadi_vllm/hf_quantizer.py: x·D by cuBLAS, Z·C by the Triton kernel on C repacked
at the first forward) with random D and C at the layer's (k, s) from ``solve_k_s`` at the given CR,
int8 values. Speed does not depend on the values, so no compression is run (offline_compress would
take minutes per model on the GPU and change nothing measured here).

    python benchmarks/decode_bench.py                      # CUDA: both models, CR 0.2/0.3, batch 1 and 16
    python benchmarks/decode_bench.py --device cpu --models tiny --steps 8   # CPU smoke run (no graphs)

Writes benchmarks/results/decode-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.kernel_bench import device_label, write_results  # noqa: E402
from cospadi_vllm import format as fmt  # noqa: E402
from cospadi_vllm.hf_quantizer import CoSpaDiLinear  # noqa: E402
from cospadi_vllm.kernels.gpu import DECODE_KERNEL_ENV  # noqa: E402
from offline_compress.budget import solve_k_s  # noqa: E402
from offline_compress.quantization import encode_coefficients  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "llama3-8b-4l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512),
}


@dataclass
class Result:
    model: str
    variant: str  # dense | cospadi-cr0.2 | ...
    batch: int
    prompt_tokens: int
    decode_steps: int
    cuda_graph: bool
    seconds: float
    tokens_per_second: float
    linear_bytes: int  # bytes of the q/k/v/o/gate/up/down weights as held
    note: str = ""


def build_model(name: str, device: torch.device, dtype: torch.dtype, smollm2_dir: Path | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2-135m" and smollm2_dir is not None:
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    config = LlamaConfig(**CONFIGS[name])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_cospadi_linear(linear: torch.nn.Linear, ratio: float, generator: torch.Generator) -> CoSpaDiLinear:
    """A CoSpaDiLinear of the linear's shape at (k, s) = solve_k_s(CR), random D and C, int8 values."""
    shape = solve_k_s(linear.in_features, linear.out_features, ratio, 2.0, "int8")
    device = linear.weight.device  # drawn on the layer's device: fast for Llama-3-8B shapes
    support = torch.rand(linear.out_features, shape.k, generator=generator, device=device).argsort(dim=1)[:, : shape.s]
    tensors = encode_coefficients(
        support, torch.randn(linear.out_features, shape.s, generator=generator, device=device), shape.k, "int8")
    module = CoSpaDiLinear(linear.in_features, linear.out_features, shape.k, shape.s, torch.int8,
                           None if linear.bias is None else linear.bias.dtype, device=device)
    with torch.no_grad():
        module.dictionary.copy_(torch.randn(linear.in_features, shape.k, generator=generator, device=device)
                                / linear.in_features**0.5)
        for suffix in (fmt.COEF_MASK, fmt.COEF_VALUES, fmt.COEF_SCALES):
            getattr(module, suffix).copy_(tensors[suffix])
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
    return module


def compress_in_place(model, ratio: float) -> None:
    """Every projection replaced by a random CoSpaDiLinear, its kernel chosen (C repacked) at once, as
    transformers' loader does: nothing is prepared inside the first forward."""
    generator = torch.Generator(device=model.device).manual_seed(int(ratio * 1000))
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            replacement = random_cospadi_linear(module, ratio, generator)
            replacement.prepare(model.dtype)
            model.set_submodule(name, replacement)


def linear_bytes(model) -> int:
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            tensors = list(module.parameters(recurse=False)) + [
                b for n, b in module.named_buffers(recurse=False) if n != "atom_offsets"]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


class GreedyDecoder:
    """Prefill once, then one-token steps on a static cache; on CUDA each step is a CUDA graph."""

    def __init__(self, model, batch: int, prompt_tokens: int, steps: int, use_graph: bool) -> None:
        from transformers import StaticCache

        self.model, self.batch, self.steps = model, batch, steps
        device = model.device
        self.max_len = prompt_tokens + steps + 4
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        generator = torch.Generator().manual_seed(batch)
        self.prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_tokens), generator=generator).to(device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(self.max_len, device=device)
        self.use_graph = use_graph
        self.graph = None

    @torch.no_grad()
    def prefill(self) -> None:
        self.cache.reset()
        n = self.prompt.shape[1]
        logits = self.model(input_ids=self.prompt, past_key_values=self.cache, use_cache=True,
                            cache_position=torch.arange(n, device=self.prompt.device)).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(n)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every sequence: reads ids / position, writes the next ids, advances position."""
        mask = (self.slots <= self.position).view(1, 1, 1, -1).expand(self.batch, 1, 1, self.max_len)
        logits = self.model(input_ids=self.ids, position_ids=self.position.view(1, 1).expand(self.batch, 1),
                            cache_position=self.position, attention_mask=mask, past_key_values=self.cache,
                            use_cache=True).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)

    def capture(self) -> None:
        """Warm up eagerly on a side stream (Triton compiles, layers repack), then capture one step."""
        self.prefill()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def decode(self) -> list[int]:
        """Prefill, then ``steps`` steps; returns the generated tokens of sequence 0 (the prefill's first)."""
        self.prefill()
        tokens = [int(self.ids[0, 0])]
        for _ in range(self.steps - 1):
            self.graph.replay() if self.graph is not None else self.step()
            tokens.append(int(self.ids[0, 0]))
        return tokens

    def seconds(self) -> float:
        """Time of the decode steps after a prefill (CUDA events on GPU, wall clock on CPU)."""
        self.prefill()
        if self.model.device.type != "cuda":
            start = time.perf_counter()
            for _ in range(self.steps):
                self.step()
            return time.perf_counter() - start
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.steps):
            self.graph.replay() if self.graph is not None else self.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@torch.no_grad()
def reference_tokens(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens of sequence 0 recomputed from the whole sequence each step (no cache)."""
    sequence = prompt[:1]
    for _ in range(steps):
        next_id = model(input_ids=sequence, use_cache=False).logits[:, -1:].argmax(-1)
        sequence = torch.cat([sequence, next_id], 1)
    return sequence[0, prompt.shape[1]:].tolist()


def measure(model, name: str, variant: str, batch: int, args, device: torch.device) -> Result:
    use_graph = device.type == "cuda"
    decoder = GreedyDecoder(model, batch, args.prompt_tokens, args.steps, use_graph)
    note = ""
    if use_graph:
        try:
            decoder.capture()
        except Exception as error:  # noqa: BLE001 (recorded in the results, measured eagerly instead)
            decoder.graph, use_graph = None, False
            note = f"CUDA graph capture failed, eager steps: {type(error).__name__}: {str(error)[:200]}"
            torch.cuda.synchronize()
    check_steps = min(args.steps, 8)
    tokens = decoder.decode()[:check_steps]
    expected = reference_tokens(model, decoder.prompt, check_steps)
    if tokens != expected:
        note = (note + " " if note else "") + f"greedy tokens differ from the no-cache recompute: {tokens} vs {expected}"
    samples = [decoder.seconds() for _ in range(args.repeats)]
    seconds = statistics.median(samples)
    result = Result(name, variant, batch, args.prompt_tokens, args.steps, use_graph, seconds,
                    batch * args.steps / seconds, linear_bytes(model), note)
    print(f"{name:13s} {variant:15s} B={batch:3d} graph={use_graph!s:5s} {result.tokens_per_second:10.1f} tok/s "
          f"linears {result.linear_bytes / 1e6:8.1f} MB {note}", flush=True)
    return result


def markdown(results: list[Result], meta: dict) -> str:
    lines = [f"# Greedy decode on {meta['device']}", "", meta["protocol"], "",
             "| model | variant | batch | CUDA graph | tokens/s | vs dense | linear bytes (MB) | note |",
             "|---|---|---|---|---|---|---|---|"]
    dense = {(r.model, r.batch): r.tokens_per_second for r in results if r.variant == "dense"}
    for r in results:
        ratio = r.tokens_per_second / dense[(r.model, r.batch)] if (r.model, r.batch) in dense else float("nan")
        lines.append(f"| {r.model} | {r.variant} | {r.batch} | {'yes' if r.cuda_graph else 'no'} | "
                     f"{r.tokens_per_second:.1f} | {ratio:.2f}× | {r.linear_bytes / 1e6:.1f} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=None,
                        help="default: smollm2-135m llama3-8b-4l")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smollm2", type=Path, help="a local HF directory with SmolLM2-135M's real weights")
    parser.add_argument("--decode-kernels", nargs="+", choices=["lanes", "bitwalk"], default=["lanes"],
                        help="GPU decode kernels to run the CoSpaDi variants with (cospadi_vllm/kernels/gpu.py)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16
    results: list[Result] = []
    for name in args.models or ["smollm2-135m", "llama3-8b-4l"]:
        variants = [(f"cospadi-cr{r}" + ("" if kernel == "lanes" else f"-{kernel}"), r, kernel)
                    for r in args.ratios for kernel in args.decode_kernels]
        for variant, ratio, kernel in [("dense", None, None), *variants]:
            model = build_model(name, device, dtype, args.smollm2 if name == "smollm2-135m" else None)
            if ratio is not None:
                os.environ[DECODE_KERNEL_ENV] = kernel
                compress_in_place(model, ratio)
            for batch in args.batch:
                results.append(measure(model, name, variant, batch, args, device))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = {
        "device": device_label(device),
        "torch": torch.__version__,
        "protocol": (f"Greedy decode, bf16, prompt {args.prompt_tokens} random tokens, {args.steps} decode steps, "
                     f"median of {args.repeats} runs; static KV cache, each step one CUDA graph replay on GPUs "
                     "(eager on CPU). Random weights unless a real SmolLM2 directory was given; CoSpaDi layers "
                     "are random at solve_k_s's (k, s) for the CR, int8 values, k/s = 2. llama3-8b-4l has 4 of "
                     "Llama-3-8B's 32 layers and its full 128256-token lm_head. Every run checks its first "
                     "greedy tokens against a no-cache recompute (a mismatch is noted)."),
    }
    write_results(args.out / f"decode-{meta['device']}", meta, "results", results, markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
