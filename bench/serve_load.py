"""Load test of a local Ray Serve deployment against the same vLLM engine called directly.

N concurrent clients (the official `openai` async client, loopback only) send a bounded number
of completion requests to a model deployed with `rayapp.serving.deploy.deploy_model`; then the
same prompts go, with the same concurrency, to a vLLM `AsyncLLMEngine` with the same engine
settings inside a Ray actor. Every request is greedy with `ignore_eos`, so both sides generate
exactly `max_tokens` tokens per prompt and tokens/s compare like for like.

Headline: ratio = Serve tokens/s / direct tokens/s (target >= 0.95), with zero errors.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m-instruct] [--clients 64] [--requests 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _procstat import print_shares, shares, snapshot  # noqa: E402

TOPICS = ["the ocean", "a small robot", "bread baking", "the moon landing", "autumn leaves", "prime numbers",
          "a busy market", "mountain weather", "old libraries", "learning to swim", "city trains", "honey bees"]
STYLES = ["Write one sentence about {}.", "Explain {} to a child in a few words.",
          "List three facts about {}, briefly and clearly, one per line, without any introduction.",
          "Describe {}."]


def make_prompts(n: int) -> list[str]:
    return [STYLES[i % len(STYLES)].format(TOPICS[(i * 7) % len(TOPICS)]) for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(latencies: list[float], tokens: int, errors: int, wall: float) -> dict:
    return {
        "requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(_pct(latencies, 50), 3), "latency_p95_s": round(_pct(latencies, 95), 3),
        "latency_p99_s": round(_pct(latencies, 99), 3),
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
    }


async def load_serve(url: str, key: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies: list[float] = []
    tokens = errors = 0
    error_samples: list[str] = []

    async def worker():
        nonlocal tokens, errors
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                out = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, extra_body={"ignore_eos": True})
                latencies.append(time.perf_counter() - t0)
                tokens += out.usage.completion_tokens
            except Exception as e:  # counted, and a few shown: the target is zero
                errors += 1
                if len(error_samples) < 3:
                    error_samples.append(repr(e)[:300])

    # Warm-up: one request so neither side pays first-request costs in the timed run.
    await client.completions.create(model=model, prompt="warm up", max_tokens=2)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    result = summarize(latencies, tokens, errors, time.perf_counter() - t0)
    result["error_samples"] = error_samples
    await client.close()
    return result


def direct_engine_actor(ray, model_dir: str, engine_kwargs: dict, kv_gib: int):
    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
                                                      "TOKENIZERS_PARALLELISM": "false"}})
    class DirectEngineActor:
        def __init__(self):
            from vllm import AsyncEngineArgs, AsyncLLMEngine

            self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model_dir, **engine_kwargs))

        async def _one(self, prompt: str, max_tokens: int, rid: str) -> tuple[float, int]:
            from vllm import SamplingParams

            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            t0 = time.perf_counter()
            final = None
            async for out in self.engine.generate(prompt, params, request_id=rid):
                final = out
            return time.perf_counter() - t0, len(final.outputs[0].token_ids)

        async def run(self, prompts: list[str], clients: int, max_tokens: int) -> dict:
            await self._one("warm up", 2, "warmup")
            queue = list(enumerate(prompts))
            latencies: list[float] = []
            tokens = 0

            async def worker():
                nonlocal tokens
                while queue:
                    i, prompt = queue.pop(0)
                    lat, n = await self._one(prompt, max_tokens, f"r{i}")
                    latencies.append(lat)
                    tokens += n

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return summarize(latencies, tokens, 0, time.perf_counter() - t0)

    return DirectEngineActor.remote()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    args = parser.parse_args()

    import ray
    from ray import serve

    from rayapp.config.base import DeployConfig
    from rayapp.models.io import resolve_model
    from rayapp.serving import local_head
    from rayapp.serving.app import build_llm_config
    from rayapp.serving.deploy import deploy_model

    model_dir = str(resolve_model(args.model))
    prompts = make_prompts(args.requests)
    key = os.urandom(12).hex()
    os.environ["RAYAPP_BENCH_KEY"] = key
    own_head = not os.environ.get("RAY_ADDRESS")
    if own_head:  # a head of our own, removed at the end
        os.environ["RAYAPP_LOCAL_CLUSTER_FILE"] = str(Path(tempfile.mkdtemp()) / "local_cluster.json")
    deploy = DeployConfig(enabled=True, port=_free_port(), max_model_len=args.max_model_len,
                          api_key_env="RAYAPP_BENCH_KEY", max_num_seqs=64)
    name = "bench-model"
    try:
        t0 = time.time()
        info = deploy_model(model_dir, {}, deploy, name)
        serve_start_s = time.time() - t0
        before = snapshot()
        serve_result = asyncio.run(load_serve(info.url, key, name, prompts, args.clients, args.max_tokens))
        serve_cpu = shares(before, snapshot())
        serve.delete(name)  # free the cores before the direct run

        engine_kwargs = dict(build_llm_config(model_dir, name, deploy).engine_kwargs)
        engine_kwargs.pop("tensor_parallel_size", None)
        t0 = time.time()
        actor = direct_engine_actor(ray, model_dir, engine_kwargs, deploy.kv_cache_gib)
        ray.get(actor.__ray_ready__.remote())  # the engine is built in __init__: not in the window below
        warm = snapshot()
        direct_result = ray.get(actor.run.remote(prompts, args.clients, args.max_tokens))
        direct_cpu = shares(warm, snapshot())
        direct_start_s = time.time() - t0 - direct_result["wall_s"]
        ray.kill(actor)
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        if own_head:
            local_head.stop_local_head()

    ratio = serve_result["tokens_per_s"] / direct_result["tokens_per_s"]
    result = {
        "ratio": round(ratio, 3), "target": 0.95, "errors_target": 0,
        "headline": "Ray Serve (ray.serve.llm + rayapp ingress) tokens/s over the same vLLM engine called directly",
        "model": args.model, "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "serve": serve_result, "direct": direct_result,
        "startup_s": {"serve_deploy": round(serve_start_s, 1), "direct_engine": round(direct_start_s, 1)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cpu_share_by_process": {"serve": serve_cpu, "direct": direct_cpu},
        "met": ratio >= 0.95 and serve_result["errors"] == 0,
    }
    print(f"{'':8} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'errors':>6}")
    for label, r in (("serve", serve_result), ("direct", direct_result)):
        print(f"{label:8} {r['requests_per_s']:8.2f} {r['tokens_per_s']:8.1f} {r['latency_p50_s']:7.2f} "
              f"{r['latency_p95_s']:7.2f} {r['latency_p99_s']:7.2f} {r['errors']:6d}")
    print_shares("\nCPU by process while Serve was under load", serve_cpu)
    print_shares("CPU by process during the direct run", direct_cpu)
    print(f"ratio serve/direct tokens/s: {ratio:.3f} (target 0.95); errors {serve_result['errors']} (target 0)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
