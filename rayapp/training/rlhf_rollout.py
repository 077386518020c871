"""Rollouts for the RL loop: generate with the vLLM pool, score with rule rewards and reward-model
actors, and turn the result into padded tensors for the policy update.

A rollout is a plain dict (it is broadcast from rank 0 to every train rank):
``{"prompt_ids", "response_ids", "text", "score", "parts", "group"}``, plus ``rollout_logps`` when the engine
returned log-probs.
"""

from __future__ import annotations

import time

from rayapp.errors import UserError


class RolloutError(UserError, RuntimeError):
    pass


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt exactly as the engine tokenizes it (chat template, generation prompt, no extra specials)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


class RewardModelActor:
    """A reward model (a reward_model job's model/) scoring (prompt, response) conversations; runs as a
    Ray actor. Conversations are rendered as its training rows were (its job's data.chat_template:
    with 'never', plain text, not the tokenizer's chat template)."""

    def __init__(self, model_dir: str, threads: int = 1):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        from rayapp.data.tokenize import trained_chat_template

        self.chat_template = trained_chat_template(model_dir)

    def score(self, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
        import torch

        from rayapp.data.tokenize import render_conversation

        texts = [render_conversation(self.tokenizer, c, self.chat_template) for c in conversations]
        out: list[float] = []
        self.tokenizer.padding_side = "right"
        with torch.no_grad():
            for k in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[k : k + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
                out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out


def start_reward_actors(model_dir: str, n: int, cpus: float) -> list:
    import ray

    actor = ray.remote(RewardModelActor)
    actors = [actor.options(num_cpus=cpus).remote(model_dir, 1) for _ in range(n)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    return actors


def collect_rollouts(pool, prompts: list, sampling, tokenizer, reward, reward_actors: list, rm_weight: float) -> tuple[list[dict], dict]:
    """Generate for ``prompts`` (PromptRecords), score every completion; returns (rollouts, timings).
    Each rollout carries ``rollout_logps``, the engine's log-prob of each token it sampled (vLLM
    returns the sampled token's with ``logprobs=0``; of the distribution it sampled from when the
    engine runs with ``engine.logprobs_mode: processed``)."""
    import ray

    t0 = time.perf_counter()
    if sampling.logprobs is None:
        sampling = sampling.model_copy(update={"logprobs": 0})
    completions = pool.generate([p.messages for p in prompts], sampling)
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    rollouts = []
    for c in completions:
        record = prompts[c.prompt_index]
        if not c.ok:
            raise RolloutError(f"data.train: prompt {c.prompt_index} of this iteration could not be generated: {c.error}")
        ids = prompt_token_ids(tokenizer, record.messages)
        if len(ids) != c.prompt_tokens:
            raise RolloutError(
                f"the trainer tokenizes a prompt to {len(ids)} tokens but the engine to {c.prompt_tokens}; "
                "the engine and the policy must load the same tokenizer (model.path)"
            )
        row = dict(record.extra)
        row["prompt"] = record.messages[-1]["content"]
        score, parts = reward(c.text, row) if reward is not None else (0.0, {})
        rollout = {"prompt_ids": ids, "response_ids": list(c.token_ids), "text": c.text, "score": score, "parts": parts,
                   "group": c.prompt_index, "finish_reason": c.finish_reason}
        if c.logprobs is not None:
            rollout["rollout_logps"] = [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        rollouts.append(rollout)
    if reward_actors:
        conversations = [prompts[r["group"]].messages + [{"role": "assistant", "content": r["text"]}] for r in rollouts]
        shards = [list(range(k, len(conversations), len(reward_actors))) for k in range(len(reward_actors))]
        refs = [a.score.remote([conversations[i] for i in idx]) for a, idx in zip(reward_actors, shards, strict=True) if idx]
        for idx, values in zip([s for s in shards if s], ray.get(refs), strict=True):
            for i, v in zip(idx, values, strict=True):
                rollouts[i]["parts"]["reward_model"] = v
                rollouts[i]["score"] += rm_weight * v
    return rollouts, {"generate_s": t_gen, "reward_s": time.perf_counter() - t1}


def collate_rollouts(rollouts: list[dict], pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, T) and ``labels`` (B, T) holding the
    response tokens only (IGNORE_INDEX elsewhere), so token_logps gives (B, T-1) response log-probs;
    when every rollout has the engine's ``rollout_logps``, ``rollout_logp`` (B, T-1) holds them at
    the same positions as token_logps' output (0 elsewhere)."""
    import torch

    from rayapp.algorithms import IGNORE_INDEX

    longest = max(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rollouts)
    b = len(rollouts)
    input_ids = torch.full((b, longest), pad_id, dtype=torch.long)           # (B, T)
    attention_mask = torch.zeros((b, longest), dtype=torch.long)             # (B, T)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)        # (B, T)
    for i, r in enumerate(rollouts):
        p, g = r["prompt_ids"], r["response_ids"]
        n = len(p) + len(g)
        input_ids[i, :n] = torch.tensor(p + g, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(g, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
           "scores": torch.tensor([float(r["score"]) for r in rollouts], dtype=torch.float32)}
    if all("rollout_logps" in r for r in rollouts):
        rollout_logp = torch.zeros((b, longest - 1), dtype=torch.float32)     # (B, T-1), aligned with token_logps
        for i, r in enumerate(rollouts):
            p, g = len(r["prompt_ids"]), len(r["response_ids"])
            rollout_logp[i, p - 1 : p - 1 + g] = torch.tensor(r["rollout_logps"], dtype=torch.float32)
        out["rollout_logp"] = rollout_logp
    return out


def takes_logits_to_keep(model) -> bool:
    """Whether ``model``'s forward (inside DDP and peft wrappers) takes ``logits_to_keep``, as
    transformers' causal LMs do."""
    import inspect

    from rayapp.training.parallel import unwrap

    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def logits_kwargs(batch: dict) -> dict:
    """The forward's ``logits_to_keep`` when :func:`response_window` cut the batch, else nothing."""
    return {"logits_to_keep": batch["logits_to_keep"]} if "logits_to_keep" in batch else {}


def response_window(b: dict) -> None:
    """Cut a collated batch to the positions its log-probs need, in place: the LM head (a vocab-wide
    matmul: a fifth of SmolLM2-135M's forward, and its (B, T, 49152) logits) then runs at the
    K = T - p0 + 1 last positions, p0 being the earliest response token of any row (the prompts
    before it are still attended to), instead of at all T. ``labels`` and ``rollout_logp`` keep
    their last K and K - 1 columns, so token_logps on the K logits gives the same (B, K-1) log-probs
    as the last K-1 columns of the uncut (B, T-1) ones; ``logits_to_keep`` = K goes to the model's
    forward (TRL's GRPO does the same)."""
    from rayapp.algorithms import IGNORE_INDEX

    labels = b["labels"]
    t = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(labelled) == 0:
        return
    k = min(t, t - int(labelled[0]) + 1)
    b["labels"] = labels[:, t - k :]
    if "rollout_logp" in b:
        b["rollout_logp"] = b["rollout_logp"][:, t - k :]
    b["logits_to_keep"] = k


def mixed_groups(rollouts: list[dict], n: int) -> float:
    """Share of consecutive groups of ``n`` rollouts (one prompt's) whose scores are not all equal:
    the groups that carry a nonzero group-relative advantage."""
    groups = [[r["score"] for r in rollouts[k : k + n]] for k in range(0, len(rollouts), n)]
    return sum(max(g) > min(g) for g in groups) / max(1, len(groups))
