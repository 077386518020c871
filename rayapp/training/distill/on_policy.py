"""method: on_policy — on-policy distillation: the student samples, the teacher grades every token.

The driver starts two vLLM pools: the student's (``on_policy.engine``, loaded from the student's
start) and the teacher's (``teacher.engine``). The Ray Train workers then run, per iteration:

1. rank 0 picks ``prompts_per_iteration`` prompts of data.train and the student's engines sample
   ``samples_per_prompt`` completions each at ``temperature``;
2. the teacher's engines score exactly those tokens: prompt log-probs of prompt + completion
   (``VLLMEnginePool.score``: ``SamplingParams(prompt_logprobs=0, max_tokens=1)``); with
   ``reward_weight`` > 0 each completion also gets a task reward (1 when its answer matches the
   row's output_text); the samples are broadcast to every rank;
3. each rank scores its share with the student (logits / T before log_softmax) and sets each
   token's advantage to the negative reverse KL, -(log pi_s - log pi_t) (+ reward_weight x reward):
   ``rayapp.algorithms.on_policy``; with ``top_k`` > 0 the teacher also returns its top-k
   log-probs at those positions and the loss adds the reverse KL over them (plus a tail bucket,
   ``rayapp.algorithms.kd.topk_kd_loss``): dense supervision on the student's own prefixes;
4. ``update_epochs`` passes of the clipped surrogate, ``train.global_batch_size`` samples per
   optimizer step, normalised by the step's global token count (as the RL loop of kind: rlhf);
5. the new weights go to the student's engines (``rayapp.teachers.weight_sync``, as kind: rlhf),
   and rank 0 checks that they arrived: the engines' log-probs of two of this iteration's samples
   against the trainer's (``sync_max_logp_diff``).

metrics.jsonl gets one row per iteration: ``reverse_kl`` (per-token mean of log pi_s - log pi_t
on the iteration's samples, before its update), ``tokens_trained`` (cumulative sampled tokens
x update_epochs: what the student trained on), ``sample_accuracy`` when the rows have answers,
and ``val_answer_accuracy`` (greedy answers of the student's engines on ``eval_examples`` rows of
evaluation.data, every ``train.eval_every`` iterations and at the end; before training it goes
to initial_eval.json). The model is kept in eval mode (no dropout) for both the scoring pass and
the update, so the importance ratio is 1 at the first step, as in the engine.

Reuses the RL loop's pieces: rollout collation and prompt tokenisation (``rlhf_rollout``), the
weight sync, placement record (``rlhf_sync``); the loss is its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

from rayapp.training.distill.data import (
    DistillData,
    DistillDataError,
    DistillItem,
    check_same_vocab,
    eval_rows,
)
from rayapp.training.distill.method import Method, Trainable

CURVES = {"reverse_kl": "reverse KL to the teacher (per token)", "val_answer_accuracy": "held-out answer accuracy",
          "sample_accuracy": "accuracy of the student's samples", "policy_loss": "policy loss"}
LOSS_SUMS = ("policy_loss", "clip_fraction", "topk_kl")  # token sums over an iteration's passes


def engine_prompt_ids(tokenizer, prompt) -> list[int]:
    """The prompt's token ids as the engine makes them (``LocalEngine.encode``): messages through
    the chat template without extra specials, plain text with the tokenizer's specials."""
    from rayapp.training.rlhf_rollout import prompt_token_ids

    return prompt_token_ids(tokenizer, prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)


def answer_of(label: str | None, task_type: str) -> str | None:
    """A row's gold answer (a worked answer reduced to its final answer, as evaluation rows are)."""
    from rayapp.teachers.templates import parse_rationale

    if label is None:
        return None
    return parse_rationale(label, task_type)[1] or label


def build_data(cfg, tokenizer, out, *, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    """The prompts of data.train (tokenized as the engine will) and their answers."""
    from rayapp.data.loaders import load_distill_inputs
    from rayapp.data.tokenize import use_chat_template

    if not dry:
        check_same_vocab(cfg, tokenizer, teacher_dir)
    records, st = load_distill_inputs(cfg.data.train, cfg.data)
    op = cfg.on_policy
    missing = [i for i, r in enumerate(records) if r.label is None]
    if op.reward_weight > 0 and missing:
        raise DistillDataError(
            f"{cfg.data.train}: row {missing[0] + 1}: output_text: missing, but on_policy.reward_weight ({op.reward_weight}) > 0 "
            f"scores each completion against its row's answer ({len(missing)} row(s) without one); give every row an "
            "output_text or set on_policy.reward_weight: 0")
    data = DistillData([], None, {"train": st.to_dict()}, chat=use_chat_template(tokenizer, cfg.data.chat_template))
    engine_prompts = data.render_for_engine([r.input_text for r in records])
    items = [DistillItem(engine_prompt_ids(tokenizer, p), [], prompt=r.input_text) for p, r in zip(engine_prompts, records, strict=True)]
    samples = op.iterations * op.prompts_per_iteration * op.samples_per_prompt
    notes = [f"on-policy: {op.iterations} iterations x {op.prompts_per_iteration} prompts x {op.samples_per_prompt} samples "
             f"(= {samples} student completions of at most {op.max_new_tokens} tokens, each scored by the teacher)"]
    longest = max((len(it.input_ids) for it in items), default=0)
    if longest + op.max_new_tokens > op.engine.max_model_len:
        notes.append(f"warning: the longest prompt has {longest} tokens; with on_policy.max_new_tokens={op.max_new_tokens} some "
                     f"completions stop at on_policy.engine.max_model_len={op.engine.max_model_len}")
    return data.replace(train=items, notes=notes)


def build_model(cfg, student, payload: dict, device) -> Trainable:
    """The student as the loop trains it (its loss is the RL-style update in this module)."""
    return Trainable(student.eval(), loss_fn=None)


# -- worker ----------------------------------------------------------------------------------------
def sample_and_score(spool, tpool, prompts: list[dict], cfg, tokenizer) -> tuple[list[dict], dict]:
    """Rank 0: the student's samples for ``prompts`` ({prompt, prompt_ids, answer}), each with the
    teacher's log-prob of every sampled token and a task score; returns (rollouts, timings)."""
    from rayapp.config.base import SamplingConfig
    from rayapp.evaluation import score_answers
    from rayapp.training.distill.teacher import topk_from_scores
    from rayapp.training.rlhf_rollout import RolloutError

    op = cfg.on_policy
    t0 = time.perf_counter()
    sampling = SamplingConfig(temperature=op.temperature, max_tokens=op.max_new_tokens, n=op.samples_per_prompt, top_p=1.0, top_k=-1)
    completions = spool.generate([p["prompt"] for p in prompts], sampling)
    t_gen = time.perf_counter() - t0
    rollouts = []
    for c in completions:
        p = prompts[c.prompt_index]
        if not c.ok:
            raise RolloutError(f"data.train: a prompt of this iteration could not be sampled by the student: {c.error}")
        if len(p["prompt_ids"]) != c.prompt_tokens:
            raise RolloutError(f"the trainer tokenizes a prompt to {len(p['prompt_ids'])} tokens but the student's engine to "
                               f"{c.prompt_tokens}; the engine and the trainer must load the same tokenizer")
        score = 0.0
        if p["answer"] is not None:
            score = float(score_answers([{"input_text": "", "label": p["answer"]}], [c.text], cfg.task_type, "auto")["correct"])
        rollouts.append({"prompt_ids": p["prompt_ids"], "response_ids": list(c.token_ids), "text": c.text, "score": score,
                         "group": c.prompt_index})
    t1 = time.perf_counter()
    k = op.top_k
    scored = tpool.score([r["prompt_ids"] + r["response_ids"] for r in rollouts], top_k=k)  # per sequence, len - 1 entries
    for r, per_pos in zip(rollouts, scored, strict=True):
        answer = per_pos[len(r["prompt_ids"]) - 1 :]  # entry j: log p(seq[j + 1] | seq[: j + 1])
        if k:  # {token: log-prob} of the top k plus the sampled token
            r["teacher_logps"] = [d[t] for d, t in zip(answer, r["response_ids"], strict=True)]
            r["topk_ids"], r["topk_logprobs"] = topk_from_scores(answer, k)
        else:
            r["teacher_logps"] = answer
    return rollouts, {"generate_s": t_gen, "teacher_s": time.perf_counter() - t1}


def prepare_batches(model, rollouts: list[dict], cfg, pad_id: int, device) -> list[dict]:
    """This rank's samples as micro-batches with the student's log-probs at the sampling
    temperature (no gradient), the teacher's, and the per-token advantages."""
    import torch

    from rayapp.algorithms.on_policy import reverse_kl_advantages, tempered_token_logps
    from rayapp.algorithms.sft import response_mask
    from rayapp.training.rlhf_rollout import collate_rollouts

    op, mb = cfg.on_policy, cfg.train.micro_batch_size
    batches = []
    with torch.no_grad():
        for k in range(0, len(rollouts), mb):
            part = rollouts[k : k + mb]
            b = {key: v.to(device) for key, v in collate_rollouts(part, pad_id).items()}
            teacher = torch.zeros(b["input_ids"].shape[0], b["input_ids"].shape[1] - 1, device=device)   # (B, T-1)
            for i, r in enumerate(part):
                s = len(r["prompt_ids"]) - 1
                teacher[i, s : s + len(r["response_ids"])] = torch.tensor(r["teacher_logps"], dtype=torch.float32)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            b["old_logp"], mask = tempered_token_logps(logits, b["labels"], op.temperature)          # (B, T-1)
            b["mask"] = mask.float()
            b["teacher_logp"] = teacher * b["mask"]
            b["adv"] = reverse_kl_advantages(b["old_logp"], b["teacher_logp"], b["mask"], b["scores"], op.reward_weight)
            if op.top_k:  # (B, T, K) at the position that predicts each sampled token (rayapp.algorithms.kd's layout)
                B, T = b["input_ids"].shape
                ids = torch.zeros((B, T, op.top_k), dtype=torch.long)
                lps = torch.full((B, T, op.top_k), -math.log(op.top_k))
                for i, r in enumerate(part):
                    s, n = len(r["prompt_ids"]) - 1, len(r["response_ids"])
                    if n:
                        ids[i, s : s + n] = torch.tensor(r["topk_ids"], dtype=torch.long)
                        lps[i, s : s + n] = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
                b["topk_ids"], b["topk_logprobs"], b["topk_mask"] = ids.to(device), lps.to(device), response_mask(b["labels"])
            batches.append(b)
    return batches


def update(model, opt, batches: list[dict], cfg, world: int) -> dict:
    """``on_policy.update_epochs`` passes over this rank's micro-batches; summed metrics by name."""
    import torch

    from rayapp.algorithms.kd import topk_kd_loss
    from rayapp.algorithms.on_policy import on_policy_distill_loss, tempered_token_logps
    from rayapp.training.loop import all_reduce
    from rayapp.training.parallel import clip_grad_norm

    op = cfg.on_policy
    per_step = cfg.train.global_batch_size // (world * cfg.train.micro_batch_size)  # micro-batches per step
    sums = dict.fromkeys((*LOSS_SUMS, "grad_norm"), 0.0)
    n_steps = 0
    g = torch.Generator().manual_seed(cfg.train.seed + opt.optimizer_steps)
    for _ in range(op.update_epochs):
        order = torch.randperm(len(batches), generator=g).tolist()
        for s in range(0, len(order), per_step):
            group = [batches[i] for i in order[s : s + per_step]]
            tokens = all_reduce(torch.tensor([float(sum(b["mask"].sum().item() for b in group))], dtype=torch.float64))
            normaliser = max(float(tokens.item()), 1.0) / world  # DDP averages over ranks
            for j, b in enumerate(group):
                last = j == len(group) - 1
                with model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext():
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    logp, _ = tempered_token_logps(logits, b["labels"], op.temperature)
                    pl, clip = on_policy_distill_loss(logp, b["old_logp"], b["adv"], b["mask"], op.clip_eps, normaliser)
                    loss = pl
                    if op.top_k:  # dense term: reverse KL over the teacher's top k (+ tail) at every sampled position
                        kl_sum, _ = topk_kd_loss(logits, b["topk_ids"], b["topk_logprobs"], b["topk_mask"], "reverse_kl", topk_mode="tail")
                        loss = loss + op.topk_weight * kl_sum / normaliser
                        sums["topk_kl"] += float(kl_sum.detach())
                    loss.backward()
                sums["policy_loss"] += float(pl.detach()) * normaliser
                sums["clip_fraction"] += float(clip) * float(b["mask"].sum())
            if cfg.train.max_grad_norm is not None:
                sums["grad_norm"] += clip_grad_norm(model, cfg.train.max_grad_norm)
            opt.step()
            n_steps += 1
    sums["steps"] = n_steps
    return sums


def sync_check(model, spool, rollouts: list[dict], pad_id: int, device, n: int = 2) -> float:
    """Rank 0, after the weight sync: the largest gap between the engines' log-probs (T = 1) of
    ``n`` of this iteration's samples and the trainer's; float32 numerics keep it below 1e-3 when
    the engines hold the new weights."""
    import torch

    from rayapp.algorithms.sft import token_logps
    from rayapp.training.parallel import unwrap
    from rayapp.training.rlhf_rollout import collate_rollouts

    rows = [r for r in rollouts if r["response_ids"]][:n]
    if not rows:
        return 0.0
    engine = spool.score([r["prompt_ids"] + r["response_ids"] for r in rows])
    b = {k: v.to(device) for k, v in collate_rollouts(rows, pad_id).items()}
    with torch.no_grad():  # the module inside DDP: a forward on one rank only
        logp, mask = token_logps(unwrap(model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    diff = 0.0
    for i, (r, e) in enumerate(zip(rows, engine, strict=True)):
        mine = logp[i][mask[i]].tolist()
        theirs = e[len(r["prompt_ids"]) - 1 :]
        diff = max(diff, max(abs(a - c) for a, c in zip(mine, theirs, strict=True)))
    return diff


def engine_accuracy(spool, prompts: list, rows: list[dict], cfg) -> float:
    """Greedy answers of the student's engines to held-out ``rows``, scored as the final evaluation does."""
    from rayapp.config.base import SamplingConfig
    from rayapp.evaluation import score_answers

    outs = spool.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=cfg.evaluation.max_new_tokens, n=1))
    return score_answers(rows, [c.text for c in outs], cfg.task_type, "auto")["accuracy"]


def on_policy_worker(config: dict) -> None:
    """Runs on every Ray Train worker (or in this process): the whole on-policy loop."""
    import torch
    import torch.distributed as dist

    from rayapp.algorithms.on_policy import reverse_kl_sum
    from rayapp.data.readers import read_jsonl
    from rayapp.models.io import load_tokenizer
    from rayapp.teachers.weight_sync import build_weight_sync, resolve_transport
    from rayapp.training.checkpoint import report_and_remove, save_checkpoint, truncate_metrics
    from rayapp.training.launch import build_model as load_student
    from rayapp.training.launch import worker_context
    from rayapp.training.loop import all_reduce_sums, build_optimizer, global_batch_indices
    from rayapp.training.outputs import export_model
    from rayapp.training.rlhf_sync import record_placement

    w = worker_context(config)
    cfg, data = w.cfg, w.payload
    rank, world, op = w.rank, w.world, w.cfg.on_policy
    prompts, spool, tpool = data["prompts"], data["student_pool"], data["teacher_pool"]
    tokenizer = load_tokenizer(data["student_dir"])
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(cfg.train.seed)
    model = w.prepare(build_model(cfg, load_student(data["student_dir"], cfg), data, w.device).model)
    model.eval()  # no dropout: the scoring pass, the update and the engine compute the same distribution
    opt = build_optimizer(model, cfg.train, cfg.planned_steps(), checkpoint=w.reporter.latest_checkpoint())
    gpu_sync = cfg.resources.use_gpu and op.engine.use_gpu
    sync = build_weight_sync(op.weight_sync, spool, rank, gpu_sync, op.sync_bucket_mib * 2**20)
    metrics_path = w.store.path("metrics.jsonl")
    record_placement(spool, resolve_transport(op.weight_sync, gpu_sync), rank, world, Path(w.store.local))
    start, tokens_trained = opt.resumed_step or 0, 0.0
    if rank == 0:
        w.store.pull("metrics.jsonl")  # what an earlier attempt uploaded (output_dir at a URI)
        truncate_metrics(metrics_path, start)
        if start and metrics_path.exists():
            tokens_trained = read_jsonl(metrics_path)[-1].get("tokens_trained", 0.0)
    if opt.resumed_step is not None:
        sync.push(model)  # the engines start from the student's start: give them the resumed weights
    elif rank == 0 and data["eval_rows"]:
        w.store.write_json("initial_eval.json", {"answer_accuracy": engine_accuracy(spool, data["eval_prompts"], data["eval_rows"], cfg)})

    for it in range(start, op.iterations):
        t_iter = time.perf_counter()
        box = [None]
        if rank == 0:
            idx = global_batch_indices(it, len(prompts), op.prompts_per_iteration, cfg.train.seed)
            box = [sample_and_score(spool, tpool, [prompts[i] for i in idx], cfg, tokenizer)]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        rollouts, timing = box[0]
        t_train = time.perf_counter()
        batches = prepare_batches(model, rollouts[rank::world], cfg, pad_id, w.device)
        local = {"rkl": sum(float(reverse_kl_sum(b["old_logp"], b["teacher_logp"], b["mask"])) for b in batches),
                 "tokens": sum(float(b["mask"].sum()) for b in batches),
                 "teacher_logp": sum(float(b["teacher_logp"].sum()) for b in batches)}
        sums = update(model, opt, batches, cfg, world)
        local.update({k: sums[k] for k in LOSS_SUMS})
        t_sync = time.perf_counter()
        sync_s = sync.push(model)
        t_end = time.perf_counter()
        red = all_reduce_sums(local)
        per_token = max(red["tokens"], 1.0)
        tokens_trained += red["tokens"] * op.update_epochs
        done = it + 1 == op.iterations
        m = {
            "step": it + 1,
            "reverse_kl": red["rkl"] / per_token,
            "teacher_logp": red["teacher_logp"] / per_token,
            "tokens": red["tokens"],
            "tokens_trained": tokens_trained,
            "response_len": sum(len(r["response_ids"]) for r in rollouts) / len(rollouts),
            "sample_accuracy": sum(r["score"] for r in rollouts) / len(rollouts),
            **{k: red[k] / (per_token * op.update_epochs) for k in LOSS_SUMS},
            "lr": opt.lr,
            "grad_norm": sums["grad_norm"] / max(1, sums["steps"]),
            "time_generate_s": timing["generate_s"],
            "time_teacher_s": timing["teacher_s"],
            "time_train_s": t_sync - t_train,
            "time_sync_s": sync_s,
        }
        m.update({f"sync_{k}": v for k, v in sync.last.items()})
        if rank == 0:
            m["sync_max_logp_diff"] = sync_check(model, spool, rollouts, pad_id, w.device)
            if data["eval_rows"] and ((it + 1) % cfg.train.eval_every == 0 or done):
                m["val_answer_accuracy"] = engine_accuracy(spool, data["eval_prompts"], data["eval_rows"], cfg)
        m["time_iteration_s"] = time.perf_counter() - t_iter if rank == 0 else t_end - t_iter
        ckpt_dir = None
        if (it + 1) % cfg.train.checkpoint_every == 0 or done:
            ckpt_dir = save_checkpoint(model, opt.optimizer, it + 1, opt.optimizer_steps, None, rank, world)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            acc = f" val acc {m['val_answer_accuracy']:.3f}" if "val_answer_accuracy" in m else ""
            print(f"[{cfg.name}] on-policy iter {it + 1}/{op.iterations} reverse KL {m['reverse_kl']:.4f} sample acc "
                  f"{m['sample_accuracy']:.3f}{acc} tokens {int(tokens_trained)} | gen {m['time_generate_s']:.1f}s teacher "
                  f"{m['time_teacher_s']:.1f}s train {m['time_train_s']:.1f}s sync {m['time_sync_s'] * 1000:.0f}ms "
                  f"(engine vs trainer {m['sync_max_logp_diff']:.1e})",
                  file=sys.__stdout__, flush=True)  # Ray Train patches print(), which would show every line twice
            if ckpt_dir or done:
                w.store.push("metrics.jsonl")
        if ckpt_dir:
            # Only at checkpoints, as the supervised loop: a report waits until Ray Train's controller has
            # taken the previous one, which it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s). Reported
            # every iteration, that capped a 0.7 s iteration at one per 2 s. metrics.jsonl has every iteration.
            report_and_remove(w.reporter, m, ckpt_dir)
    sync.close()
    export_model(model, tokenizer, cfg, w)


# -- driver ----------------------------------------------------------------------------------------
def rounds(cfg, data: DistillData, student_dir, teacher_dir: str | None, tokenizer, train) -> dict:
    """Start the student's and the teacher's engines, run the workers' loop, summarise the curve.
    ``train`` (the recipe's one-run trainer) is not called: only its ``in_process`` flag is read."""
    from rayapp.data.loaders import load_distill_inputs
    from rayapp.data.readers import read_jsonl
    from rayapp.runtime import check_resources, ensure_ray
    from rayapp.storage import open_output
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.teachers.weight_sync import resolve_transport
    from rayapp.training.launch import launch

    in_process = bool(train.keywords.get("in_process")) if isinstance(train, partial) else False
    op, r, te = cfg.on_policy, cfg.resources, cfg.teacher.engine
    if teacher_dir is None:
        raise DistillDataError("method: on_policy needs teacher.path (the teacher scores the student's samples)")
    records, _ = load_distill_inputs(cfg.data.train, cfg.data)  # the answers, in data.train's order
    engine_prompts = data.render_for_engine([it.prompt for it in data.train])
    prompts = [{"prompt": p, "prompt_ids": it.input_ids, "answer": answer_of(rec.label, cfg.task_type)}
               for p, it, rec in zip(engine_prompts, data.train, records, strict=True)]
    rows = eval_rows(cfg, data)[: op.eval_examples] if cfg.evaluation.data and op.eval_examples else []
    ensure_ray()
    need = (0 if in_process else r.num_workers * r.cpus_per_worker) + op.engine.num_engines * op.engine.cpus_per_engine + \
        te.num_engines * te.cpus_per_engine
    gpus = (r.num_workers * r.gpus_per_worker if r.use_gpu and not in_process else 0) + \
        sum(e.num_engines * e.tensor_parallel_size for e in (op.engine, te) if e.use_gpu)
    check_resources(cpus=need, gpus=gpus, what=f"distill job '{cfg.name}' (train workers + the student's and the teacher's engines)")
    transfer = "nccl" if resolve_transport(op.weight_sync, r.use_gpu and op.engine.use_gpu) == "nccl" else None
    print(f"[{cfg.name}] on-policy: starting {op.engine.num_engines} student and {te.num_engines} teacher vLLM engine(s)", flush=True)
    with ThreadPoolExecutor(2) as ex:  # the two pools start side by side (each waits ~20 s for its engines on CPU)
        starting = [ex.submit(VLLMEnginePool, str(student_dir), op.engine, name="student", weight_transfer=transfer),
                    ex.submit(VLLMEnginePool, str(teacher_dir), te, name="teacher")]
        wait(starting)
    pools = [f.result() for f in starting if f.exception() is None]
    if len(pools) < 2:
        for p in pools:
            p.shutdown()
        raise next(f.exception() for f in starting if f.exception() is not None)
    with pools[0] as spool, pools[1] as tpool:
        final = launch(on_policy_worker, cfg, in_process=in_process, student_dir=str(student_dir), prompts=prompts,
                       eval_rows=rows, eval_prompts=data.render_for_engine([x["input_text"] for x in rows]),
                       student_pool=spool, teacher_pool=tpool)
    store = open_output(cfg.output_dir)
    store.pull("metrics.jsonl")
    curve = read_jsonl(store.path("metrics.jsonl")) if store.path("metrics.jsonl").exists() else []
    store.close()
    if curve:
        final = {**final, "reverse_kl_first": curve[0]["reverse_kl"], "reverse_kl_last": curve[-1]["reverse_kl"],
                 "tokens_trained": curve[-1]["tokens_trained"]}
    return final


METHOD = Method(build_data=build_data, build_model=build_model, rounds=rounds)
