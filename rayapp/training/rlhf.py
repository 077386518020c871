"""`kind: rlhf` — PPO or GRPO with rollouts from vLLM actors and updates on Ray Train workers.

Reads top to bottom. The driver loads the prompts, starts the rollout engine pool (and the
reward-model actors), and launches the train workers with the actors' handles. Each iteration,
inside the workers:

1. rollouts: rank 0 asks the pool for ``sampling.n`` completions of ``rl.prompts_per_iteration``
   prompts, scores them (rule rewards in-process, reward model on its actors) and broadcasts them;
2. each rank takes its share and computes, without gradients, the old policy's log-probs (and
   values for PPO) and the frozen reference's log-probs (skipped when ``rl.kl_coeff`` is 0);
3. advantages: GRPO normalises rewards within each prompt's group; PPO puts ``-kl_coeff * k1``
   on every token and the score on the last, then GAE with the value head, whitened over the batch;
4. ``rl.update_epochs`` passes of clipped policy (+ value) loss, ``train.global_batch_size``
   rollouts per optimizer step, losses normalised by the step's global token count;
5. weight sync to every engine (``rayapp.training.weight_sync``), timed.

Metrics per iteration go to metrics.jsonl: reward mean/std (and each term), KL to the reference,
entropy, response length, clip fraction, value loss, time split (generate / score / train / sync).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rayapp.training.common import check_result, prepare_output, write_json_atomic

SERIES_PLOTS = {
    "reward": {"reward_mean": "mean reward", "eval_reward": "greedy eval reward"},
    "time": {"time_generate_s": "generate", "time_score_s": "score", "time_train_s": "train", "time_sync_s": "sync"},
}


def load_prompts(cfg):
    from rayapp.data.loaders import load_prompts as load

    train, stats = load(cfg.data.train, cfg.data)
    val = None
    if cfg.data.validation:
        val, _ = load(cfg.data.validation, cfg.data)
    return train, val, stats


def validate(cfg) -> str:
    from rayapp.rewards import build_reward

    train, val, stats = load_prompts(cfg)
    reward = build_reward(cfg.rl.rewards)
    reward("", dict(train[0].extra, prompt=train[0].messages[-1]["content"]))  # a missing field fails here
    text = f"train: {cfg.data.train}\n{stats.format()}"
    return text + (f"\nvalidation: {len(val)} prompts" if val else "")


# -- worker ------------------------------------------------------------------------------------
def _forward(model, batch, with_values: bool):
    """(logits, values or None); values (B, T) only from a CausalLMWithValueHead."""
    if with_values:
        return model(batch["input_ids"], batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, None


def _prepare_batches(rollouts, pad_id, mb, model, ref, ppo: bool, device):
    """Collate this rank's rollouts into micro-batches with old log-probs, reference log-probs and values."""
    import torch

    from rayapp.algorithms.sft import token_logps
    from rayapp.training.rlhf_rollout import collate_rollouts

    batches = []
    model.eval()
    with torch.no_grad():
        for k in range(0, len(rollouts), mb):
            part = rollouts[k : k + mb]
            b = {key: v.to(device) for key, v in collate_rollouts(part, pad_id).items()}
            logits, values = _forward(model, b, ppo)
            b["old_logp"], mask = token_logps(logits, b["labels"])                 # (B, T-1)
            b["mask"] = mask.float()
            b["ref_logp"] = token_logps(ref(b), b["labels"])[0] if ref is not None else b["old_logp"]
            if ppo:
                b["old_values"] = values[:, :-1] * b["mask"]                          # (B, T-1)
            b["advantage"] = torch.tensor([r.get("advantage", 0.0) for r in part], device=device)
            batches.append(b)
    model.train()
    return batches


def _all_reduce(t):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _ppo_advantages(batches, cfg):
    """Token rewards with the KL penalty, GAE, and advantages whitened over the whole batch (all ranks)."""
    import torch

    from rayapp.algorithms.rl import gae, kl_penalized_rewards

    for b in batches:
        rewards = kl_penalized_rewards(b["scores"], b["old_logp"], b["ref_logp"], b["mask"], cfg.rl.kl_coeff)
        b["adv"], b["returns"] = gae(rewards, b["old_values"], b["mask"], cfg.rl.gamma, cfg.rl.lam)
    if cfg.rl.whiten_advantages:
        stats = torch.zeros(3, dtype=torch.float64)
        for b in batches:
            m = b["mask"].double().cpu()
            a = b["adv"].double().cpu()
            stats += torch.stack([(a * m).sum(), (a * a * m).sum(), m.sum()])
        s, ss, n = _all_reduce(stats).tolist()
        mean = s / max(n, 1.0)
        std = max(ss / max(n, 1.0) - mean * mean, 0.0) ** 0.5
        for b in batches:
            b["adv"] = (b["adv"] - mean) / (std + 1e-8) * b["mask"]


def _update(model, optimizer, scheduler, batches, cfg, world: int, ppo: bool, params):
    """``rl.update_epochs`` passes over this rank's micro-batches; returns summed metrics."""
    import torch

    from rayapp.algorithms.rl import POLICY_LOSSES, entropy_from_logits, value_loss
    from rayapp.algorithms.sft import token_logps

    policy_loss = POLICY_LOSSES[cfg.algorithm]
    per_step = cfg.train.global_batch_size // (world * cfg.train.micro_batch_size)  # micro-batches per step
    kl_in_loss = cfg.rl.kl_coeff if cfg.algorithm == "grpo" else 0.0
    sums = {k: 0.0 for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy", "grad_norm")}
    n_steps = 0
    g = torch.Generator().manual_seed(cfg.train.seed + scheduler.last_epoch)
    for _ in range(cfg.rl.update_epochs):
        order = torch.randperm(len(batches), generator=g).tolist()
        for s in range(0, len(order), per_step):
            group = [batches[i] for i in order[s : s + per_step]]
            tokens = _all_reduce(torch.tensor([float(sum(b["mask"].sum().item() for b in group))], dtype=torch.float64))
            normaliser = max(float(tokens.item()), 1.0) / world  # DDP averages over ranks
            for j, b in enumerate(group):
                sync = j == len(group) - 1
                ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _Null()
                with ctx:
                    logits, values = _forward(model, b, ppo)
                    logp, _ = token_logps(logits, b["labels"])
                    adv = b["adv"] if ppo else b["advantage"].unsqueeze(-1) * b["mask"]
                    pl, clip_frac, approx_kl = policy_loss(
                        logp, b["old_logp"], adv, b["mask"], cfg.rl.clip_eps, ref_logp=b["ref_logp"], kl_coef=kl_in_loss, normaliser=normaliser
                    )
                    loss = pl
                    if ppo:
                        v = values[:, :-1]
                        vloss, _ = value_loss(v, b["old_values"], b["returns"], b["mask"], cfg.rl.value_clip, normaliser=normaliser)
                        loss = loss + cfg.rl.value_coeff * vloss
                        sums["value_loss"] += float(vloss.detach()) * normaliser
                    loss.backward()
                with torch.no_grad():
                    ent = entropy_from_logits(logits[:, :-1].detach())
                    sums["entropy"] += float((ent * b["mask"]).sum())
                sums["policy_loss"] += float(pl.detach()) * normaliser
                n_tok = float(b["mask"].sum())
                sums["clip_fraction"] += float(clip_frac) * n_tok
                sums["approx_kl"] += float(approx_kl) * n_tok
            if cfg.train.max_grad_norm is not None:
                sums["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n_steps += 1
    sums["steps"] = n_steps
    return sums


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _reference(cfg, model_dir, lm, device):
    """Reference forward ``ref(batch) -> logits``, or None when ``rl.kl_coeff`` is 0."""
    if cfg.rl.kl_coeff == 0:
        return None
    if cfg.adapter is not None:  # the base with adapters disabled: no second copy of the weights
        def ref_peft(b):
            with lm.disable_adapter():
                return lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return ref_peft
    from rayapp.models.io import load_causal_lm

    ref = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code).to(device).eval().requires_grad_(False)
    return lambda b: ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def rlhf_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the whole RL loop."""
    import ray
    import torch
    import torch.distributed as dist

    from rayapp.algorithms.rl import grpo_advantages, kl_k1
    from rayapp.config.loader import load_job_dict
    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import CausalLMWithValueHead
    from rayapp.training.common import build_model, prepare_for_ray
    from rayapp.training.launch import RayReporter, worker_setup
    from rayapp.training.loop import (
        _load_checkpoint,
        _save_checkpoint,
        _truncate_metrics,
        global_batch_indices,
        lr_lambda,
    )
    from rayapp.training.rlhf_rollout import collect_rollouts
    from rayapp.training.weight_sync import build_weight_sync

    cfg = load_job_dict(config["job"])
    env = worker_setup(cfg.resources.cpus_per_worker)
    rank, world, device = env["rank"], env["world"], env["device"]
    ppo = cfg.algorithm == "ppo"
    prompts, val_prompts = ray.get(config["prompts"]), (ray.get(config["val"]) if config["val"] is not None else None)
    tokenizer = load_tokenizer(config["model_dir"])
    pool = config["pool"]
    torch.manual_seed(cfg.train.seed)  # the fresh value head is identical on every rank
    lm = build_model(config["model_dir"], cfg)
    model = prepare_for_ray(CausalLMWithValueHead(lm) if ppo else lm, cfg.resources.strategy)
    ref = _reference(cfg, config["model_dir"], lm, device)
    params = [p for p in model.parameters() if p.requires_grad]
    head = {id(p) for n, p in model.named_parameters() if "value_head" in n}
    groups = [{"params": [p for p in params if id(p) not in head], "lr": cfg.train.peak_lr}]
    if head:
        groups.append({"params": [p for p in params if id(p) in head], "lr": cfg.train.peak_lr * cfg.rl.value_lr_multiplier})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    steps_per_iter = cfg.rl.update_epochs * cfg.rollouts_per_iteration // cfg.train.global_batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train, cfg.rl.iterations * steps_per_iter))
    sync = build_weight_sync(cfg.rl.weight_sync, pool.actors, rank, cfg.resources.use_gpu, cfg.engine.num_engines * cfg.engine.tensor_parallel_size)
    reporter = RayReporter()
    metrics_path = Path(cfg.output_dir) / "metrics.jsonl"
    start = 0
    ckpt = reporter.latest_checkpoint()
    if ckpt:
        start = _load_checkpoint(ckpt, model, optimizer, scheduler)
        sync.push(model)  # the engines start from model.path: give them the resumed policy
        if rank == 0:
            print(f"[{cfg.name}] resuming at iteration {start} ({ckpt})", flush=True)
    if rank == 0:
        _truncate_metrics(metrics_path, start)

    n = cfg.sampling.n
    for it in range(start, cfg.rl.iterations):
        t_iter = time.perf_counter()
        box = [None]
        if rank == 0:
            idx = global_batch_indices(it, len(prompts), cfg.rl.prompts_per_iteration, cfg.train.seed)
            rollouts, timing = collect_rollouts(
                pool, [prompts[i] for i in idx], cfg.sampling, tokenizer, config["reward"], config["reward_actors"], cfg.rl.reward_model_weight
            )
            if cfg.algorithm == "grpo":
                adv = grpo_advantages(torch.tensor([r["score"] for r in rollouts]), n, scale_by_std=cfg.rl.scale_by_std)
                for r, a in zip(rollouts, adv.tolist(), strict=True):
                    r["advantage"] = a
            box = [(rollouts, timing)]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        rollouts, timing = box[0]
        t_score = time.perf_counter()
        batches = _prepare_batches(rollouts[rank::world], tokenizer.pad_token_id, cfg.train.micro_batch_size, model, ref, ppo, device)
        if ppo:
            _ppo_advantages(batches, cfg)
        t_train = time.perf_counter()
        sums = _update(model, optimizer, scheduler, batches, cfg, world, ppo, params)
        t_sync = time.perf_counter()
        sync_s = sync.push(model)
        t_end = time.perf_counter()

        # -- metrics: token sums all-reduced; rollout stats from the full batch every rank holds
        kl = sum(float((kl_k1(b["old_logp"], b["ref_logp"]) * b["mask"]).sum()) for b in batches)
        toks = sum(float(b["mask"].sum()) for b in batches)
        red = _all_reduce(torch.tensor([kl, toks] + [sums[k] for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy")], dtype=torch.float64)).tolist()
        tokens = max(red[1], 1.0)
        steps = max(1, sums["steps"])
        scores = torch.tensor([r["score"] for r in rollouts])
        m = {
            "step": it + 1,
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl_ref": red[0] / tokens,
            "policy_loss": red[2] / tokens / cfg.rl.update_epochs,
            "clip_fraction": red[4] / tokens / cfg.rl.update_epochs,
            "approx_kl": red[5] / tokens / cfg.rl.update_epochs,
            "entropy": red[6] / tokens / cfg.rl.update_epochs,
            "response_len": sum(len(r["response_ids"]) for r in rollouts) / len(rollouts),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": sums["grad_norm"] / steps,
            "time_generate_s": timing["generate_s"],
            "time_score_s": timing["reward_s"] + (t_train - t_score),
            "time_train_s": t_sync - t_train,
            "time_sync_s": sync_s,
        }
        if ppo:
            m["value_loss"] = red[3] / tokens / cfg.rl.update_epochs
        for key in rollouts[0]["parts"]:
            m[key] = sum(r["parts"].get(key, 0.0) for r in rollouts) / len(rollouts)
        m.update({f"sync_{k}": v for k, v in getattr(sync, "last", {}).items()})
        m["time_iteration_s"] = t_end - t_iter  # on rank 0, which writes the metrics, this includes generation
        m["sync_share"] = m["time_sync_s"] / max(m["time_iteration_s"], 1e-9)
        done = it + 1 == cfg.rl.iterations
        if cfg.rl.eval_prompts and val_prompts and rank == 0 and ((it + 1) % cfg.train.eval_every == 0 or done or it == start):
            m["eval_reward"] = evaluate_greedy(pool, val_prompts[: cfg.rl.eval_prompts], cfg, config["reward"])
        ckpt_dir = None
        if (it + 1) % cfg.train.checkpoint_every == 0 or done:
            ckpt_dir = _save_checkpoint(model, optimizer, scheduler, it + 1, None, rank)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            print(
                f"[{cfg.name}] iter {it + 1}/{cfg.rl.iterations} reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f} "
                f"kl {m['kl_ref']:.4f} len {m['response_len']:.1f} clip {m['clip_fraction']:.3f} | gen {m['time_generate_s']:.1f}s "
                f"score {m['time_score_s']:.1f}s train {m['time_train_s']:.1f}s sync {m['time_sync_s'] * 1000:.0f}ms",
                file=sys.__stdout__,  # Ray Train patches print() to also log it, which shows every line twice
                flush=True,
            )
        reporter.report(m, ckpt_dir)
        if ckpt_dir:
            import shutil

            shutil.rmtree(ckpt_dir, ignore_errors=True)
    sync.close()
    _export(model, tokenizer, cfg, rank)


def evaluate_greedy(pool, prompts, cfg, reward) -> float:
    """Mean reward of greedy completions of ``prompts`` with the engines' current weights."""
    sampling = cfg.sampling.model_copy(update={"temperature": 0.0, "n": 1, "seed": None})
    outs = pool.generate([p.messages for p in prompts], sampling)
    total = 0.0
    for c in outs:
        p = prompts[c.prompt_index]
        total += reward(c.text, dict(p.extra, prompt=p.messages[-1]["content"]))[0]
    return total / max(1, len(outs))


def _export(model, tokenizer, cfg, rank: int) -> None:
    """model/ (and adapter/) of the policy, without the value head."""
    if rank != 0:
        return
    from rayapp.models.io import save_model_atomic
    from rayapp.models.lora import export_lora
    from rayapp.training.weight_sync import unwrap

    lm = unwrap(model).to("cpu")
    if cfg.adapter is not None:
        export_lora(lm, tokenizer, cfg.output_dir, cfg.adapter.export)
    else:
        save_model_atomic(lm, tokenizer, Path(cfg.output_dir) / "model")


# -- driver ------------------------------------------------------------------------------------
def run(cfg, pool=None) -> dict:
    """Run the job; ``pool`` reuses running rollout engines (kept running afterwards; tests, benches)."""
    from rayapp.models.io import resolve_model
    from rayapp.rewards import build_reward
    from rayapp.runtime import check_resources, ensure_ray
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.training.launch import launch
    from rayapp.training.report import plot_curves, read_metrics, write_report
    from rayapp.training.rlhf_rollout import start_reward_actors

    t0 = time.perf_counter()
    out = prepare_output(cfg)
    model_dir = resolve_model(cfg.model.path)
    prompts, val, stats = load_prompts(cfg)
    reward = build_reward(cfg.rl.rewards) if cfg.rl.rewards else None
    if reward is not None:  # a reward that cannot read these rows fails here, before anything starts
        reward("", dict(prompts[0].extra, prompt=prompts[0].messages[-1]["content"]))
    rm_dir = None
    if cfg.rl.reward_model:
        rm_dir = Path(cfg.rl.reward_model)
        rm_dir = rm_dir / "model" if (rm_dir / "model" / "config.json").exists() else rm_dir
        resolve_model(str(rm_dir))
    write_json_atomic(out / "data_stats.json", {"train": stats.to_dict()})
    ray = ensure_ray()
    e, r = cfg.engine, cfg.resources
    need = r.num_workers * r.cpus_per_worker + e.num_engines * e.cpus_per_engine + (cfg.rl.reward_model_actors * cfg.rl.reward_model_cpus if rm_dir else 0)
    check_resources(cpus=need, gpus=(r.num_workers * r.gpus_per_worker if r.use_gpu else 0) + (e.num_engines * e.tensor_parallel_size if e.use_gpu else 0),
                    what=f"rlhf job '{cfg.name}' (train workers + rollout engines + reward-model actors)")
    print(f"[{cfg.name}] {cfg.algorithm}: {len(prompts)} prompts, {cfg.rl.iterations} iterations x {cfg.rollouts_per_iteration} rollouts; starting {e.num_engines} vLLM engine(s)", flush=True)
    own_pool = pool is None
    pool = VLLMEnginePool(model_dir, e, name="rollout") if own_pool else pool
    if not own_pool:
        pool.update_weights(str(model_dir))  # an earlier job may have left other weights in the engines
    reward_actors = []
    try:
        if rm_dir:
            reward_actors = start_reward_actors(str(rm_dir), cfg.rl.reward_model_actors, cfg.rl.reward_model_cpus)
        worker_config = {
            "job": cfg.model_dump(mode="json"),
            "model_dir": str(model_dir),
            "prompts": ray.put(prompts),
            "val": ray.put(val) if val else None,
            "pool": pool,
            "reward": reward,
            "reward_actors": reward_actors,
        }
        check_result(launch(rlhf_worker, worker_config, cfg), cfg)
    finally:
        if own_pool:
            pool.shutdown()
        for a in reward_actors:
            ray.kill(a)
    rows = read_metrics(out / "metrics.jsonl")
    evaluation = summarize(rows)
    evaluation["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "eval.json", evaluation)
    sections = []
    for name, series in SERIES_PLOTS.items():
        png = plot_curves(rows, series, out / "plots" / f"{name}.png", name, "reward" if name == "reward" else "seconds")
        if png:
            sections.append((name, f'<img src="plots/{png.name}" alt="{name}">'))
    report = write_report(out, title=f"{cfg.name} (rlhf, {cfg.algorithm})", data_stats={"train": stats.to_dict()}, evaluation=evaluation,
                          sections=sections, curves={"policy_loss": "policy loss", "value_loss": "value loss"})
    summary = {"output_dir": str(out), "model": str(out / "model"), "report": str(report)}
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    return summary


def summarize(rows: list[dict]) -> dict:
    """Reward curve summary and the mean time split of an iteration."""
    if not rows:
        return {}
    first = rows[0]["reward_mean"]
    last5 = [r["reward_mean"] for r in rows[-5:]]
    out = {"iterations": rows[-1]["step"], "reward_first": first, "reward_last5": sum(last5) / len(last5)}
    out["reward_ratio"] = out["reward_last5"] / first if first else float("nan")
    for key in ("time_generate_s", "time_score_s", "time_train_s", "time_sync_s", "time_iteration_s", "kl_ref", "entropy", "response_len"):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[f"mean_{key}"] = sum(vals) / len(vals)
    if out.get("mean_time_iteration_s"):
        out["sync_share"] = out["mean_time_sync_s"] / out["mean_time_iteration_s"]
    return out
