"""The RL loop's side of the weight sync: where the job's processes run, and a check, after each
sync, that the rollout engines now compute what the policy computes.

The transports themselves live in ``rayapp.teachers.weight_sync``. The check
(``rl.sync_check_prompts``): rank 0 asks the engines for greedy completions of the first prompts
of the training set, with the log-prob of each generated token; every rank then scores the same
tokens with the policy as it is after the update (a forward of a sharded model is a collective).
Engines that hold the new weights give the same log-probs up to numerics (here, float32 on CPU:
below 1e-3); engines left with old weights, or a sync that lost part of the model (a bucket, the
LoRA merge), differ by far more. ``sync_check_max_logp_diff`` goes into metrics.jsonl and the
tokens into ``sync_check.jsonl`` (one line per prompt and iteration), so a run shows what its
engines generated after every sync.
"""

from __future__ import annotations

import json
from pathlib import Path

from rayapp.fileio import write_json_atomic


def record_placement(pool, transport: str, rank: int, world: int, out: Path) -> dict | None:
    """Every rank calls it: the Ray node of each train worker (gathered to rank 0) and of each
    engine; rank 0 writes them to ``placement.json`` and returns them."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node)
    if rank != 0:
        return None
    record = {"weight_sync": transport, "trainers": nodes,
              "engines": [{"node_id": i.get("node_id"), "pid": i.get("pid")} for i in pool.infos]}
    write_json_atomic(out / "placement.json", record)
    return record


def check_sync(u, pool, prompts: list, tokenizer, step: int, rank: int, world: int, out: Path) -> dict[str, float]:
    """Greedy completions of ``prompts`` (PromptRecords) from the engines, scored by the policy in
    ``u`` (a PolicyUpdate); returns ``{"sync_check_max_logp_diff": ...}`` on every rank."""
    import torch
    import torch.distributed as dist

    from rayapp.algorithms.sft import token_logps
    from rayapp.training.rlhf_rollout import collate_rollouts, prompt_token_ids

    box: list = [None]
    if rank == 0:
        sampling = u.cfg.sampling.model_copy(update={"temperature": 0.0, "n": 1, "seed": None, "logprobs": 0})
        rows = []
        for c in pool.generate([p.messages for p in prompts], sampling):
            if not c.ok or not c.token_ids:
                continue
            rows.append({"prompt_ids": prompt_token_ids(tokenizer, prompts[c.prompt_index].messages), "response_ids": list(c.token_ids),
                         "engine_logps": [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)], "prompt": c.prompt_index,
                         "score": 0.0})
        box = [rows]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    rows = box[0]
    if not rows:
        return {}
    b = {k: v.to(u.device) for k, v in collate_rollouts(rows, tokenizer.pad_token_id).items()}
    u.model.eval()
    with torch.no_grad():
        logits, _ = u.forward(b)
        logp, mask = token_logps(logits.float(), b["labels"])  # (B, T-1)
    u.model.train()
    diff = 0.0
    for i, r in enumerate(rows):
        r["trainer_logps"] = logp[i][mask[i]].tolist()
        diff = max(diff, max(abs(e - t) for e, t in zip(r["engine_logps"], r["trainer_logps"], strict=True)))
    if rank == 0:
        with open(out / "sync_check.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "prompt": r["prompt"], "response_ids": r["response_ids"],
                                    "engine_logps": r["engine_logps"], "trainer_logps": r["trainer_logps"]}) + "\n")
    return {"sync_check_max_logp_diff": diff}
