"""`kind: rlhf` — PPO or GRPO with rollouts from vLLM actors and updates on Ray Train workers.

Reads top to bottom. The driver loads the prompts, starts the rollout engine pool (and the
reward-model actors), and launches the train workers with the pool. ``algorithm`` is an entry of
``rayapp.algorithms.rl.ALGORITHMS``: its advantage estimator, policy loss and KL estimator are
looked up in the registries there. Each iteration, inside the workers:

1. rollouts: rank 0 asks the pool for ``sampling.n`` completions of ``rl.prompts_per_iteration``
   prompts, scores them (rule rewards in-process, reward model on its actors), gives a
   critic-free algorithm (GRPO) each rollout its advantage within its prompt's group, and
   broadcasts them;
2. each rank takes its share and computes, without gradients, the old policy's log-probs (and
   the critic's values) and the frozen reference's log-probs (skipped when ``rl.kl_coeff`` is 0).
   Every log-prob (old, new, reference) is of softmax(logits / sampling.temperature), the
   distribution the engine sampled from; dropout is off in the policy (and so in the LoRA
   reference, the same module), so two passes of the same weights agree and the first ratio is 1.
   The engine's own log-prob of each sampled token comes with the rollout: the trainer-vs-engine
   KL is logged (``mismatch_kl``) and, with ``rl.tis_cap``, each token's loss is weighted by
   min(pi_old / q_engine, tis_cap) (truncated importance sampling);
3. with a critic (PPO): the KL term (``-kl_coeff * k1``) on every token and the score on the
   last, then GAE with the value head, whitened over the batch;
4. ``rl.update_epochs`` passes of clipped policy (+ value) loss, ``train.global_batch_size``
   rollouts per optimizer step, losses normalised by the step's global token count;
5. weight sync to every engine (``rayapp.teachers.weight_sync``: through Ray's object store into
   each engine node's /dev/shm, or over NCCL on GPUs), timed per phase; with
   ``rl.sync_check_prompts`` the engines' greedy log-probs are checked against the policy
   (``rlhf_sync``). ``placement.json`` records the node of every train worker and engine.

Metrics per iteration go to metrics.jsonl: reward mean/std (and each term), KL to the reference,
engine-vs-trainer KL (mismatch_kl) and the share of capped importance weights (tis_capped),
entropy, response length, clip fraction, value loss, time split (generate / score / train / sync);
with ``rl.eval_prompts``, greedy held-out reward and each term (``eval_reward_exact_match``), also
at step 0 for the starting policy.
Then the shared ending: eval.json, report.html, deploy if asked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayapp.training.launch import launch, worker_context
from rayapp.training.outputs import export_model, finish, prepare_output
from rayapp.training.rlhf_rollout import logits_kwargs, mixed_groups, response_window, takes_logits_to_keep

SERIES_PLOTS = {
    "reward": {"reward_mean": "mean reward", "eval_reward": "greedy eval reward",
               "eval_reward_exact_match": "greedy held-out exact match"},
    "time": {"time_generate_s": "generate", "time_score_s": "score", "time_train_s": "train", "time_sync_s": "sync"},
}
LOSS_SUMS = ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy")  # token sums, all-reduced by name


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
@dataclass
class PolicyUpdate:
    """What one worker's update steps work with."""

    cfg: Any
    algo: Any  # rayapp.algorithms.rl.RLAlgorithm
    model: Any  # the policy (a CausalLMWithValueHead when the algorithm has a critic), wrapped for DDP
    opt: Any  # rayapp.training.loop.Optimization
    ref: Any = None  # batch -> the frozen reference's logits (of the last batch["logits_to_keep"] positions when set); None when rl.kl_coeff is 0
    world: int = 1
    device: Any = "cpu"

    @property
    def temperature(self) -> float:
        """The rollouts' sampling temperature: every log-prob of the update is taken at it."""
        return self.cfg.sampling.temperature

    @functools.cached_property
    def crops_logits(self) -> bool:
        """Whether the LM head runs at response positions only (rlhf_rollout.response_window)."""
        return not self.algo.critic and takes_logits_to_keep(self.model)

    def forward(self, batch):
        """(logits (of the last ``logits_to_keep`` positions when set), values (B, T) from the critic, or None)."""
        if self.algo.critic:
            return self.model(batch["input_ids"], batch["attention_mask"])
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **logits_kwargs(batch)).logits, None


def group_advantages(rollouts: list[dict], cfg, algo) -> None:
    """Critic-free algorithms, on rank 0 where every group is whole: each rollout's advantage from
    the outcome rewards of its prompt's group (one token reward per rollout: (B, 1))."""
    import torch

    from rayapp.algorithms.rl import ADVANTAGE_ESTIMATORS

    scores = torch.tensor([[r["score"]] for r in rollouts], dtype=torch.float32)
    adv, _ = ADVANTAGE_ESTIMATORS[algo.advantage](scores, torch.ones_like(scores), group_size=cfg.sampling.n,
                                                  scale_by_std=cfg.rl.scale_by_std)
    for r, a in zip(rollouts, adv[:, 0].tolist(), strict=True):
        r["advantage"] = a


def prepare_batches(u: PolicyUpdate, rollouts: list[dict], pad_id: int) -> list[dict]:
    """Collate this rank's rollouts into micro-batches with old log-probs, reference log-probs, the
    critic's values, token advantages where the rollouts carry one (group advantages), and the
    truncated importance weights of the engine's samples (``is_weights``, with ``rl.tis_cap``)."""
    import torch

    from rayapp.algorithms.rl import truncated_is_weights
    from rayapp.algorithms.sft import token_logps
    from rayapp.training.rlhf_rollout import collate_rollouts

    batches = []
    mb = u.cfg.train.micro_batch_size
    u.model.eval()
    with torch.no_grad():
        for k in range(0, len(rollouts), mb):
            part = rollouts[k : k + mb]
            b = {key: v.to(u.device) for key, v in collate_rollouts(part, pad_id).items()}
            if u.crops_logits:
                response_window(b)
            logits, values = u.forward(b)
            b["old_logp"], mask = token_logps(logits, b["labels"], u.temperature)  # (B, T-1)
            b["mask"] = mask.float()
            b["ref_logp"] = token_logps(u.ref(b), b["labels"], u.temperature)[0] if u.ref is not None else b["old_logp"]
            if "rollout_logp" in b and u.cfg.rl.tis_cap is not None:
                b["is_weights"] = truncated_is_weights(b["old_logp"], b["rollout_logp"], b["mask"], u.cfg.rl.tis_cap)
            if values is not None:
                b["old_values"] = values[:, :-1] * b["mask"]                          # (B, T-1)
            if "advantage" in part[0]:
                b["adv"] = torch.tensor([r["advantage"] for r in part], device=u.device).unsqueeze(-1) * b["mask"]
            batches.append(b)
    u.model.train()
    return batches


def token_advantages(u: PolicyUpdate, batches: list[dict]) -> None:
    """With a critic: the KL term in the token rewards (when the algorithm puts it there), the
    algorithm's estimator (GAE) on the critic's values, advantages whitened over the whole batch
    (all ranks)."""

    from rayapp.algorithms.rl import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, kl_penalized_rewards
    from rayapp.training.loop import all_reduce_sums

    rl = u.cfg.rl
    kl_coef = rl.kl_coeff if u.algo.kl_in == "reward" else 0.0
    estimate = ADVANTAGE_ESTIMATORS[u.algo.advantage]
    for b in batches:
        rewards = kl_penalized_rewards(b["scores"], b["old_logp"], b["ref_logp"], b["mask"], kl_coef, KL_ESTIMATORS[u.algo.kl])
        b["adv"], b["returns"] = estimate(rewards, b["mask"], values=b["old_values"], gamma=rl.gamma, lam=rl.lam)
    if rl.whiten_advantages:
        m = {"sum": 0.0, "sum_sq": 0.0, "n": 0.0}
        for b in batches:
            mask, a = b["mask"].double().cpu(), b["adv"].double().cpu()
            m["sum"] += float((a * mask).sum())
            m["sum_sq"] += float((a * a * mask).sum())
            m["n"] += float(mask.sum())
        m = all_reduce_sums(m)
        mean = m["sum"] / max(m["n"], 1.0)
        std = max(m["sum_sq"] / max(m["n"], 1.0) - mean * mean, 0.0) ** 0.5
        for b in batches:
            b["adv"] = (b["adv"] - mean) / (std + 1e-8) * b["mask"]


def update(u: PolicyUpdate, batches: list[dict]) -> dict:
    """``rl.update_epochs`` passes over this rank's micro-batches; returns summed metrics by name."""
    import torch

    from rayapp.algorithms.rl import KL_ESTIMATORS, POLICY_LOSSES, entropy_from_logits, value_loss
    from rayapp.algorithms.sft import token_logps
    from rayapp.training.loop import all_reduce
    from rayapp.training.parallel import clip_grad_norm

    cfg, rl = u.cfg, u.cfg.rl
    policy_loss, kl = POLICY_LOSSES[u.algo.policy_loss], KL_ESTIMATORS[u.algo.kl]
    kl_coef = rl.kl_coeff if u.algo.kl_in == "loss" else 0.0
    per_step = cfg.train.global_batch_size // (u.world * cfg.train.micro_batch_size)  # micro-batches per step
    sums = dict.fromkeys((*LOSS_SUMS, "grad_norm"), 0.0)
    n_steps = 0
    g = torch.Generator().manual_seed(cfg.train.seed + u.opt.optimizer_steps)
    for _ in range(rl.update_epochs):
        order = torch.randperm(len(batches), generator=g).tolist()
        for s in range(0, len(order), per_step):
            group = [batches[i] for i in order[s : s + per_step]]
            tokens = all_reduce(torch.tensor([float(sum(b["mask"].sum().item() for b in group))], dtype=torch.float64))
            normaliser = max(float(tokens.item()), 1.0) / u.world  # DDP averages over ranks
            for j, b in enumerate(group):
                sync = j == len(group) - 1
                with u.model.no_sync() if (not sync and hasattr(u.model, "no_sync")) else contextlib.nullcontext():
                    logits, values = u.forward(b)
                    logp, _ = token_logps(logits, b["labels"], u.temperature)
                    pl, clip_frac, approx_kl = policy_loss(logp, b["old_logp"], b["adv"], b["mask"], rl.clip_eps, ref_logp=b["ref_logp"],
                                                           kl_coef=kl_coef, normaliser=normaliser, kl=kl, is_weights=b.get("is_weights"))
                    loss = pl
                    if u.algo.critic:
                        vloss, _ = value_loss(values[:, :-1], b["old_values"], b["returns"], b["mask"], rl.value_clip, normaliser=normaliser)
                        loss = loss + rl.value_coeff * vloss
                        sums["value_loss"] += float(vloss.detach()) * normaliser
                    loss.backward()
                with torch.no_grad():
                    ent = entropy_from_logits(logits[:, :-1].detach().float() / u.temperature)
                    sums["entropy"] += float((ent * b["mask"]).sum())
                sums["policy_loss"] += float(pl.detach()) * normaliser
                n_tok = float(b["mask"].sum())
                sums["clip_fraction"] += float(clip_frac) * n_tok
                sums["approx_kl"] += float(approx_kl) * n_tok
            if cfg.train.max_grad_norm is not None:
                sums["grad_norm"] += clip_grad_norm(u.model, cfg.train.max_grad_norm)  # global norm
            u.opt.step()
            n_steps += 1
    sums["steps"] = n_steps
    return sums


def build_policy(model_dir: str, cfg, algo):
    """(the language model, the module trained: it with a value head when the algorithm has a
    critic). Dropout is off (TRL's choice): the old log-probs (eval mode), the update's (train
    mode) and the LoRA reference (the same module, adapters off) then come from identical
    passes, so with unchanged weights every ratio is exactly 1."""
    from rayapp.models.value_head import CausalLMWithValueHead
    from rayapp.training.launch import build_model

    lm = build_model(model_dir, cfg, dropout=False)
    return lm, (CausalLMWithValueHead(lm) if algo.critic else lm)


def reference(cfg, model_dir: str, lm, device):
    """The frozen reference as ``ref(batch) -> logits``, or None when ``rl.kl_coeff`` is 0."""
    if cfg.rl.kl_coeff == 0:
        return None
    if cfg.adapter is not None:  # the base with adapters disabled: no second copy of the weights
        def ref_peft(b):
            with lm.disable_adapter():
                return lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **logits_kwargs(b)).logits
        return ref_peft
    from rayapp.models.io import load_causal_lm

    ref = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.trust_remote_code).to(device).eval().requires_grad_(False)
    return lambda b: ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **logits_kwargs(b)).logits


def rlhf_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the whole RL loop."""
    import torch
    import torch.distributed as dist

    from rayapp.algorithms.rl import ALGORITHMS, kl_k1, mismatch_kl
    from rayapp.models.io import load_tokenizer
    from rayapp.models.value_head import policy_of
    from rayapp.teachers.weight_sync import build_weight_sync, resolve_transport
    from rayapp.training.checkpoint import report_and_remove, save_checkpoint, truncate_metrics
    from rayapp.training.loop import all_reduce_sums, build_optimizer, global_batch_indices
    from rayapp.training.rlhf_rollout import collect_rollouts
    from rayapp.training.rlhf_sync import check_sync, record_placement

    w = worker_context(config)
    cfg, data = w.cfg, w.payload
    rank, world, rl = w.rank, w.world, w.cfg.rl
    algo = ALGORITHMS[cfg.algorithm]
    prompts, val_prompts, pool = data["prompts"], data["val"], data["pool"]
    tokenizer = load_tokenizer(data["model_dir"])
    torch.manual_seed(cfg.train.seed)  # the fresh value head is identical on every rank
    lm, policy = build_policy(data["model_dir"], cfg, algo)
    model = w.prepare(policy)
    opt = build_optimizer(model, cfg.train, cfg.planned_steps(), checkpoint=w.reporter.latest_checkpoint(),
                          lr_multipliers={"value_head": rl.value_lr_multiplier})
    u = PolicyUpdate(cfg, algo, model, opt, reference(cfg, data["model_dir"], lm, w.device), world, w.device)
    gpu_sync = cfg.resources.use_gpu and cfg.engine.use_gpu
    sync = build_weight_sync(rl.weight_sync, pool, rank, gpu_sync, rl.sync_bucket_mib * 2**20)
    out = Path(w.store.local)  # this node's copy of output_dir (pushed to a URI output_dir at checkpoints)
    metrics_path = w.store.path("metrics.jsonl")
    if rank == 0:
        w.store.pull("metrics.jsonl")  # what an earlier attempt uploaded (output_dir at a URI)
    record_placement(pool, resolve_transport(rl.weight_sync, gpu_sync), rank, world, out)
    start = opt.resumed_step or 0
    if opt.resumed_step is not None:
        sync.push(model)  # the engines start from model.path: give them the resumed policy
        if rank == 0:
            print(f"[{cfg.name}] resuming from the checkpoint of iteration {start}: iteration {start + 1} of {rl.iterations} next",
                  flush=True)
    if rank == 0:
        truncate_metrics(metrics_path, start)
        truncate_metrics(out / "sync_check.jsonl", start)
        if start == 0 and rl.eval_prompts and val_prompts:  # the starting policy's held-out score: a step-0 row
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": 0, **evaluate_greedy(pool, val_prompts[: rl.eval_prompts], cfg, data["reward"])}) + "\n")

    for it in range(start, rl.iterations):
        t_iter = time.perf_counter()
        box = [None]
        if rank == 0:
            idx = global_batch_indices(it, len(prompts), rl.prompts_per_iteration, cfg.train.seed)
            rollouts, timing = collect_rollouts(pool, [prompts[i] for i in idx], cfg.sampling, tokenizer, data["reward"],
                                                data["reward_actors"], rl.reward_model_weight)
            if not algo.critic:
                group_advantages(rollouts, cfg, algo)
            box = [(rollouts, timing)]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        rollouts, timing = box[0]
        t_score = time.perf_counter()
        batches = prepare_batches(u, rollouts[rank::world], tokenizer.pad_token_id)
        if algo.critic:
            token_advantages(u, batches)
        t_train = time.perf_counter()
        sums = update(u, batches)
        t_sync = time.perf_counter()
        sync_s = sync.push(model)
        t_end = time.perf_counter()
        checked = (check_sync(u, pool, prompts[: rl.sync_check_prompts], tokenizer, it + 1, rank, world, out)
                   if rl.sync_check_prompts else {})

        # -- metrics: token sums all-reduced by name; rollout stats from the full batch every rank holds
        local = {k: sums[k] for k in LOSS_SUMS}
        local["kl_ref"] = sum(float((kl_k1(b["old_logp"], b["ref_logp"]) * b["mask"]).sum()) for b in batches)  # mean k1
        local["tokens"] = sum(float(b["mask"].sum()) for b in batches)
        engine_batches = [b for b in batches if "rollout_logp" in b]
        local["mismatch_kl"] = sum(float(mismatch_kl(b["old_logp"], b["rollout_logp"], b["mask"])) for b in engine_batches)
        local["mismatch_tokens"] = sum(float(b["mask"].sum()) for b in engine_batches)
        local["tis_capped"] = sum(float(((b["is_weights"] >= rl.tis_cap) * b["mask"]).sum()) for b in batches if "is_weights" in b)
        red = all_reduce_sums(local)
        per_token = max(red["tokens"], 1.0)
        per_update = per_token * rl.update_epochs
        scores = torch.tensor([r["score"] for r in rollouts])
        m = {
            "step": it + 1,
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl_ref": red["kl_ref"] / per_token,
            "mismatch_kl": red["mismatch_kl"] / max(red["mismatch_tokens"], 1.0),  # KL(engine || trainer) per token
            "tis_capped": red["tis_capped"] / max(red["mismatch_tokens"], 1.0),     # share of tokens at rl.tis_cap
            **{k: red[k] / per_update for k in LOSS_SUMS if k != "value_loss" or algo.critic},
            "response_len": sum(len(r["response_ids"]) for r in rollouts) / len(rollouts),
            "truncated": sum(r.get("finish_reason") == "length" for r in rollouts) / len(rollouts),  # cut at sampling.max_tokens
            "groups_mixed": mixed_groups(rollouts, cfg.sampling.n),  # share of groups whose rewards differ (nonzero GRPO advantage)
            "lr": opt.lr,
            "grad_norm": sums["grad_norm"] / max(1, sums["steps"]),
            "time_generate_s": timing["generate_s"],
            "time_score_s": timing["reward_s"] + (t_train - t_score),
            "time_train_s": t_sync - t_train,
            "time_sync_s": sync_s,
        }
        for key in rollouts[0]["parts"]:
            m[key] = sum(r["parts"].get(key, 0.0) for r in rollouts) / len(rollouts)
        m.update({f"sync_{k}": v for k, v in sync.last.items()})
        m.update(checked)
        m["time_iteration_s"] = t_end - t_iter  # on rank 0, which writes the metrics, this includes generation
        m["sync_share"] = m["time_sync_s"] / max(m["time_iteration_s"], 1e-9)
        done = it + 1 == rl.iterations
        if rl.eval_prompts and val_prompts and rank == 0 and ((it + 1) % cfg.train.eval_every == 0 or done or it == start):
            m.update(evaluate_greedy(pool, val_prompts[: rl.eval_prompts], cfg, data["reward"]))
        ckpt_dir = None
        if (it + 1) % cfg.train.checkpoint_every == 0 or done:
            ckpt_dir = save_checkpoint(model, opt.optimizer, it + 1, opt.optimizer_steps, None, rank, world)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            print(
                f"[{cfg.name}] iter {it + 1}/{rl.iterations} reward {m['reward_mean']:.3f} ± {m['reward_std']:.3f} "
                f"kl {m['kl_ref']:.4f} len {m['response_len']:.1f} clip {m['clip_fraction']:.3f} | gen {m['time_generate_s']:.1f}s "
                f"score {m['time_score_s']:.1f}s train {m['time_train_s']:.1f}s sync {m['time_sync_s'] * 1000:.0f}ms",
                file=sys.__stdout__,  # Ray Train patches print() to also log it, which shows every line twice
                flush=True,
            )
            if ckpt_dir or done:
                w.store.push("metrics.jsonl")  # the rows up to this checkpoint, before it is registered
        if ckpt_dir:
            # Checkpoints only (as loop.fit): Ray Train v2 holds a report until its controller polls (2 s).
            report_and_remove(w.reporter, m, ckpt_dir)
    sync.close()
    export_model(policy_of(model), tokenizer, cfg, w)  # the policy without the value head


def evaluate_greedy(pool, prompts, cfg, reward) -> dict[str, float]:
    """Greedy completions of ``prompts`` with the engines' current weights: ``eval_reward``, their
    mean reward, and ``eval_<term>`` the mean of each reward term (``eval_reward_exact_match``: the
    held-out accuracy)."""
    sampling = cfg.sampling.model_copy(update={"temperature": 0.0, "n": 1, "seed": None, "logprobs": None})
    outs = pool.generate([p.messages for p in prompts], sampling)
    sums: dict[str, float] = {"eval_reward": 0.0}
    for c in outs:
        p = prompts[c.prompt_index]
        score, parts = reward(c.text, dict(p.extra, prompt=p.messages[-1]["content"]))
        sums["eval_reward"] += score
        for key, value in parts.items():
            sums[f"eval_{key}"] = sums.get(f"eval_{key}", 0.0) + value
    return {k: v / max(1, len(outs)) for k, v in sums.items()}


# -- driver ------------------------------------------------------------------------------------
def run(cfg, pool=None) -> dict:
    """Run the job; ``pool`` reuses running rollout engines (kept running afterwards; tests, benches)."""
    from rayapp.models.io import resolve_model
    from rayapp.report import plot_curves, read_metrics
    from rayapp.rewards import build_reward
    from rayapp.runtime import check_resources, ensure_ray
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.teachers.weight_sync import resolve_transport
    from rayapp.training.rlhf_rollout import start_reward_actors

    t0 = time.perf_counter()
    store = prepare_output(cfg)
    out = store.local
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
    store.write_json("data_stats.json", {"train": stats.to_dict()})
    ray = ensure_ray()
    e, r = cfg.engine, cfg.resources
    need = r.num_workers * r.cpus_per_worker + e.num_engines * e.cpus_per_engine + (cfg.rl.reward_model_actors * cfg.rl.reward_model_cpus if rm_dir else 0)
    check_resources(cpus=need, gpus=(r.num_workers * r.gpus_per_worker if r.use_gpu else 0) + (e.num_engines * e.tensor_parallel_size if e.use_gpu else 0),
                    what=f"rlhf job '{cfg.name}' (train workers + rollout engines + reward-model actors)")
    print(f"[{cfg.name}] {cfg.algorithm}: {len(prompts)} prompts, {cfg.rl.iterations} iterations x {cfg.rollouts_per_iteration} rollouts; starting {e.num_engines} vLLM engine(s)", flush=True)
    own_pool = pool is None
    transfer = "nccl" if resolve_transport(cfg.rl.weight_sync, r.use_gpu and e.use_gpu) == "nccl" else None
    pool = VLLMEnginePool(model_dir, e, name="rollout", weight_transfer=transfer) if own_pool else pool
    if not own_pool:
        pool.update_weights(str(model_dir))  # an earlier job may have left other weights in the engines
        smp = cfg.sampling
        if getattr(pool.engine, "logprobs_mode", "processed") != "processed" and (smp.temperature != 1.0 or smp.top_p < 1.0 or smp.top_k > 0):
            print(f"[{cfg.name}] warning: the given engine pool returns raw log-probs (engine.logprobs_mode: raw), not those of "
                  f"its sampling at temperature {smp.temperature}: mismatch_kl and rl.tis_cap's weights will be off", flush=True)
    reward_actors = []
    try:
        if rm_dir:
            reward_actors = start_reward_actors(str(rm_dir), cfg.rl.reward_model_actors, cfg.rl.reward_model_cpus)
        launch(rlhf_worker, cfg, store=store, model_dir=str(model_dir), prompts=prompts, val=val, pool=pool, reward=reward,
               reward_actors=reward_actors)
    finally:
        if own_pool:
            pool.shutdown()
        for a in reward_actors:
            ray.kill(a)
    store.pull("metrics.jsonl")
    rows = read_metrics(out / "metrics.jsonl")
    sections = []
    for name, series in SERIES_PLOTS.items():
        png = plot_curves(rows, series, out / "plots" / f"{name}.png", name, "reward" if name == "reward" else "seconds")
        if png:
            sections.append((name, f'<img src="plots/{png.name}" alt="{name}">'))
    return finish(cfg, summarize(rows), store=store, started=t0, title=f"{cfg.name} (rlhf, {cfg.algorithm})", data_stats={"train": stats.to_dict()},
                  sections=sections, curves={"policy_loss": "policy loss", "value_loss": "value loss"})


def summarize(rows: list[dict]) -> dict:
    """Reward curve summary and the mean time split of an iteration."""
    evals = [r for r in rows if "eval_reward" in r]
    rows = [r for r in rows if "reward_mean" in r]  # not the step-0 row (the starting policy's eval alone)
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
    if evals:
        for key in (k for k in evals[0] if k.startswith("eval_")):
            out[f"{key}_first"], out[f"{key}_last"] = evals[0].get(key), evals[-1].get(key)
    return out
