"""The vLLM actor pool on the CPU build, with the tiny model: generate, logprobs, score,
update_weights, sleep/wake, and bad prompts coming back as errors instead of crashing."""

from __future__ import annotations

import math

import pytest

from rayapp.config.base import EngineConfig, SamplingConfig
from rayapp.teachers import EMPTY_PROMPT, PROMPT_TOO_LONG, Generator

PROMPTS = ["The cat sat on the", "2 + 3 =", "Once upon a time", "Hello there, how", "A B C D"]


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model_dir):
    from rayapp.teachers.pool import VLLMEnginePool

    engine = EngineConfig(num_engines=2, cpus_per_engine=1, max_model_len=128, max_num_seqs=16, kv_cache_gib=1)
    p = VLLMEnginePool(tiny_model_dir, engine)
    yield p
    p.shutdown()


def greedy(max_tokens=8, **kw):
    return SamplingConfig(temperature=0.0, max_tokens=max_tokens, **kw)


def test_pool_is_a_generator_with_one_actor_per_engine(pool):
    assert isinstance(pool, Generator)
    assert len(pool.actors) == 2
    assert len({info["pid"] for info in pool.infos}) == 2  # two separate engine processes


def test_generate_returns_completions_with_top_k_logprobs(pool):
    k = 3
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    out = pool.generate(PROMPTS + chats, SamplingConfig(temperature=1.0, max_tokens=6, logprobs=k, seed=1))
    assert [c.prompt_index for c in out] == list(range(2 * len(PROMPTS)))
    for c in out:
        assert c.ok and c.finish_reason in ("stop", "length")
        assert 1 <= len(c.token_ids) <= 6
        assert len(c.logprobs) == len(c.token_ids)
        for tok, top in zip(c.token_ids, c.logprobs, strict=True):
            assert k <= len(top) <= k + 1 and tok in top  # top-k, plus the sampled token when outside it
            assert all(lp <= 0.0 for lp in top.values())
    # chat prompts go through the ChatML template: longer than the bare text
    assert all(out[i + 5].prompt_tokens > out[i].prompt_tokens for i in range(5))


def test_n_samples_per_prompt(pool):
    out = pool.generate(PROMPTS[:2], SamplingConfig(temperature=1.0, max_tokens=4, n=3, seed=0))
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, k) for i in range(2) for k in range(3)]


def test_bad_prompts_are_reported_not_fatal(pool):
    too_long = "word " * 400
    out = pool.generate(["", PROMPTS[0], too_long, "   ", []], greedy())
    reasons = [c.finish_reason for c in out]
    assert reasons[0] == EMPTY_PROMPT and reasons[2] == PROMPT_TOO_LONG and reasons[3] == EMPTY_PROMPT
    assert reasons[4] == EMPTY_PROMPT
    assert out[1].ok and out[1].token_ids
    assert "engine.max_model_len=128" in out[2].error


def test_score_matches_generation_logprobs(pool, tiny_tokenizer):
    out = pool.generate(PROMPTS, greedy(max_tokens=6, logprobs=1))
    seqs = [tiny_tokenizer.encode(p) + c.token_ids for p, c in zip(PROMPTS, out, strict=True)]
    scores = pool.score(seqs)
    for seq, s, c in zip(seqs, scores, out, strict=True):
        assert len(s) == len(seq) - 1  # one logprob per token after the first
        assert all(isinstance(v, float) and v <= 0.0 for v in s)
        generated = s[-len(c.token_ids):]
        expected = [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(generated, expected, strict=True))
    top = pool.score(seqs[:1], top_k=4)[0]
    assert len(top) == len(seqs[0]) - 1
    assert all(4 <= len(d) <= 5 and tok in d for tok, d in zip(seqs[0][1:], top, strict=True))


def test_update_weights_changes_greedy_output_and_back(pool, tiny_model_dir, tmp_path):
    import glob

    import torch

    from rayapp.models.io import load_causal_lm
    from rayapp.teachers.weight_sync import send_buckets, staging_dir, state_buckets

    # CPU engines run their engine core in the actor's process: a state dict is loaded in memory
    # (weight_sync.send_buckets_in_memory), a directory through vLLM's file loader.
    assert all(info["core_in_process"] for info in pool.infos), pool.infos
    before = [c.token_ids for c in pool.generate(PROMPTS, greedy())]
    model = load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(0)
    model.load_state_dict({k: v + 0.5 * torch.randn_like(v) if v.dim() == 2 else v for k, v in model.state_dict().items()})
    state = model.state_dict()  # tied embeddings: one value under both names
    seconds = pool.update_weights(state)
    changed = [c.token_ids for c in pool.generate(PROMPTS, greedy())]
    assert changed != before
    print(f"update_weights(state dict) took {seconds * 1000:.0f} ms for 2 engines")
    model.save_pretrained(tmp_path / "changed")
    pool.update_weights(tmp_path / "changed")  # the same weights from files: the same answers
    assert [c.token_ids for c in pool.generate(PROMPTS, greedy())] == changed
    pool.update_weights(tiny_model_dir)
    # staged in /dev/shm and reloaded from there (engines whose core runs in another process): the same
    staged_before = set(glob.glob(staging_dir("*")))
    send_buckets(pool, state_buckets(state), in_memory=False)
    assert [c.token_ids for c in pool.generate(PROMPTS, greedy())] == changed
    assert set(glob.glob(staging_dir("*"))) == staged_before, "the staged weights were not removed"
    pool.update_weights(tiny_model_dir)  # a directory path: back to the original weights
    assert [c.token_ids for c in pool.generate(PROMPTS, greedy())] == before


def test_sleep_then_wake_serves_again(pool):
    before = [c.token_ids for c in pool.generate(PROMPTS[:2], greedy())]
    pool.sleep()
    pool.wake()
    assert [c.token_ids for c in pool.generate(PROMPTS[:2], greedy())] == before


def test_score_rejects_sequences_it_cannot_take(pool):
    import ray

    with pytest.raises((ray.exceptions.RayTaskError, ValueError), match="at least 2"):
        pool.score([[5]])


def test_kind_evaluate_vllm_backend_answers_as_transformers_does(pool, tiny_model_dir, tmp_path, monkeypatch):
    """`kind: evaluate` with `models[].backend: vllm`: the same model, asked the same held-out questions
    greedily, gives the same answers as through the transformers backend. The model is the tiny one
    with its matrices perturbed (the tiny model itself answers every chat prompt with newlines); the
    gold labels are the transformers backend's own greedy first lines (so it scores 1.0), and the vLLM
    model must score 1.0 too: a vLLM prompt rendered differently (no chat template, extra special
    tokens), another model's weights, or sampling instead of greedy changes the answers. The engine is
    this module's pool, loaded with those weights and handed to kind: evaluate in place of the pool it
    starts (asserted: for this model and evaluate.engine), so no second engine starts."""
    import json

    import torch

    import rayapp.teachers.pool as pool_module
    from rayapp import evaluation
    from rayapp.config.loader import load_job_dict
    from rayapp.models.io import load_causal_lm, load_tokenizer, save_model_atomic
    from rayapp.teachers.templates import normalize_label

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.dim() == 2:
                v.add_(0.5 * torch.randn_like(v))
    model_dir = str(save_model_atomic(model, tok, tmp_path / "perturbed"))
    questions = [f"What is {a} + {b}?" for a in (3, 12, 51, 7, 93, 40) for b in (4, 30, 29, 8)]
    max_new = 6
    hf = evaluation.generate_transformers(model_dir, evaluation.render_prompts(tok, questions), max_new)
    rows = []
    for q, text in zip(questions, hf, strict=True):
        first = text.strip().splitlines()[0] if text.strip() else ""
        if normalize_label(first, "free") and "\ufffd" not in first:  # a split UTF-8 character may be rendered otherwise
            rows.append({"input_text": q, "output_text": first})
    assert len(rows) >= 6 and len({r["output_text"] for r in rows}) >= 3, rows  # answers depend on the question
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    started = []

    class ThisModulesPool:  # what generate_vllm starts: this module's running pool, left running afterwards
        def __init__(self, model_dir, engine, name="teacher", **kw):
            started.append((str(model_dir), engine, name))

        def __enter__(self):
            return pool

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(pool_module, "VLLMEnginePool", ThisModulesPool)
    engine = {"num_engines": 2, "cpus_per_engine": 1, "max_model_len": 128, "max_num_seqs": 16, "kv_cache_gib": 1}
    cfg = load_job_dict({
        "kind": "evaluate", "data": str(data), "task_type": "free", "latency_samples": 0, "engine": engine,
        "models": [{"name": m, "path": model_dir, "backend": m, "extract": "answer", "max_new_tokens": max_new}
                   for m in ("transformers", "vllm")],
        "output_dir": str(tmp_path / "eval"),
    })
    pool.update_weights(model_dir)
    try:
        evaluation.run(cfg)
    finally:
        pool.update_weights(tiny_model_dir)  # the module's pool serves the tiny model again
    results = {r["name"]: r for r in json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]}
    assert started == [(model_dir, cfg.engine, "evaluation")], started
    assert results["transformers"]["correct"] == results["transformers"]["n"] == len(rows), results["transformers"]
    assert results["vllm"]["backend"] == "vllm"
    assert results["vllm"]["correct"] == len(rows), [(s["gold"], s["completion"]) for s in results["vllm"]["samples"]]
    assert results["vllm"]["accuracy"] == results["transformers"]["accuracy"] == 1.0


def test_concurrent_generate_calls_share_one_engine(ray_cluster, tiny_model_dir):
    """A batch stage's actor runs several batches at once (max_concurrency > 1): the calls' requests
    join one engine batch, and each call gets back exactly its own completions, greedy outputs
    equal to one call with every prompt."""
    import ray

    from rayapp.teachers.pool import LocalEngine, engine_env

    engine = EngineConfig(cpus_per_engine=1, max_model_len=128, max_num_seqs=16, kv_cache_gib=1)
    actor = ray.remote(LocalEngine).options(num_cpus=1, max_concurrency=4, runtime_env={"env_vars": engine_env(engine)}) \
        .remote(tiny_model_dir, engine.model_dump())
    try:
        prompts = [f"{p} {k}" for k in range(4) for p in PROMPTS]  # 20 prompts, 4 calls of 5
        sampling = greedy(max_tokens=12).model_dump()
        whole = ray.get(actor.generate.remote(prompts, sampling))
        parts = ray.get([actor.generate.remote(prompts[i : i + 5], sampling, list(range(i, i + 5))) for i in range(0, 20, 5)])
        got = [c for part in parts for c in part]
        assert [c["prompt_index"] for c in got] == list(range(20))
        assert [c["token_ids"] for c in got] == [c["token_ids"] for c in whole]
        # n > 1 in one call beside another call
        two = ray.get([actor.generate.remote(PROMPTS[:2], {**sampling, "n": 3, "temperature": 1.0}),
                       actor.generate.remote(prompts[2:5], sampling)])
        assert [(c["prompt_index"], c["sample_index"]) for c in two[0]] == [(i, k) for i in range(2) for k in range(3)]
        assert [c["token_ids"] for c in two[1]] == [c["token_ids"] for c in whole[2:5]]
    finally:
        ray.kill(actor)
