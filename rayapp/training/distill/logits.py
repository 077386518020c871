"""method: logits — response-based KD from the teacher's top-k next-token log-probs (vLLM).

Data (driver): tuning rows with their responses (``logits.responses: given``), or distillation
inputs whose responses the teacher writes (``teacher``); each item gets the teacher's top-k
log-probs at every response position (``teacher.teacher_topk``, cached). Every item keeps the
prompt it answers, so on-policy rounds know which items a student sample replaces.

Loss: the top-k KD divergence summed over response positions (+ ``ce_weight`` x NLL).

On-policy (GKD, ``logits.lmbda`` > 0): done in rounds. Each round exports the student, starts it
in a vLLM engine, samples responses to a ``lmbda`` share of the items' prompts, has the teacher
score those tokens (top-k), and trains ``max_steps / rounds`` steps on them plus the other
items. Within a round the samples are fixed (a round is off-policy by at most its own steps).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from rayapp.training.distill.data import DistillData, check_same_vocab, encode_examples, sft_items
from rayapp.training.distill.method import Method, Trainable, round_config, student_forward
from rayapp.training.loop import LossParts


def with_topk(cfg, items: list, out: Path, pool=None, tag: str = "topk") -> list:
    """Attach the teacher's top-k log-probs (cached in out/teacher/<tag>.jsonl) to each item."""
    from rayapp.training.distill.teacher import teacher_topk

    if not items:
        return items
    rows = teacher_topk(cfg, [it.input_ids for it in items], out, pool, tag)
    return [dataclasses.replace(it, topk_ids=r["ids"], topk_logprobs=r["logprobs"]) for it, r in zip(items, rows, strict=True)]


def build_data(cfg, tokenizer, out: Path, *, dry: bool = False, student_dir=None, teacher_dir=None) -> DistillData:
    from rayapp.data.loaders import load_distill_inputs
    from rayapp.data.tokenize import use_chat_template
    from rayapp.training.distill.teacher import LazyTeacherPool, teacher_responses

    if not dry:
        check_same_vocab(cfg, tokenizer, teacher_dir)
    notes: list[str] = []
    # One teacher engine for the responses and their top-k, started only when one of them is not
    # cached in out/teacher/ (a re-run of the same job starts none).
    with LazyTeacherPool(cfg) as pool:
        if cfg.logits.responses == "teacher":
            records, st = load_distill_inputs(cfg.data.train, cfg.data)
            prompts = [r.input_text for r in records]
            if dry:
                responses = ["?"] * len(prompts)
                notes.append(f"the teacher writes {len(prompts)} responses at `rayapp run`")
            else:
                responses = teacher_responses(cfg, prompts, out, pool)
            train, _ = encode_examples(cfg, tokenizer, [(p, r, "response") for p, r in zip(prompts, responses, strict=True) if r.strip()],
                                       str(cfg.data.train))
            data = DistillData(train, None, {"train": st.to_dict()}, notes=notes)
        else:
            data = sft_items(cfg, tokenizer)
        data.chat = use_chat_template(tokenizer, cfg.data.chat_template)
        if dry:
            notes.append(f"teacher top-{cfg.logits.top_k} log-probs are computed at `rayapp run` for {len(data.train)} sequences")
            return data.replace(notes=notes)
        train = with_topk(cfg, data.train, out, pool, "topk")
        val = with_topk(cfg, data.val, out, pool, "topk_validation") if data.val else None
    return data.replace(train=train, val=val, notes=notes)


def loss(lc):
    """The loop's loss_fn for a ``logits`` section ``lc``."""
    from rayapp.algorithms.kd import topk_kd_loss
    from rayapp.algorithms.sft import response_mask, token_nll_sum

    def loss_fn(model, batch):
        logits, _ = student_forward(model, batch)
        mask = response_mask(batch["labels"])
        kd_sum, n = topk_kd_loss(logits, batch["topk_ids"], batch["topk_logprobs"], mask,
                                 lc.divergence, lc.beta, lc.temperature, lc.topk_mode)
        nll, _ = token_nll_sum(logits, batch["labels"])
        total = kd_sum + lc.ce_weight * nll if lc.ce_weight else kd_sum
        return LossParts(total, int(n), {"kd_loss": kd_sum.detach(), "nll": nll.detach()})

    return loss_fn


def build_model(cfg, student, payload: dict, device) -> Trainable:
    return Trainable(student, loss(cfg.logits))


def rounds(cfg, data: DistillData, student_dir: Path, teacher_dir: str | None, tokenizer, train) -> dict:
    """On-policy GKD rounds (see the module docstring); one plain run when ``logits.lmbda`` is 0."""
    from rayapp.config.base import SamplingConfig
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.training.distill.teacher import LazyTeacherPool

    lc = cfg.logits
    if lc.lmbda == 0:
        return train(cfg, data, student_dir, teacher_dir)
    from rayapp.storage import open_output

    store = open_output(cfg.output_dir)  # the teacher's top-k of each round is cached under store.local/teacher
    steps = max(1, cfg.train.max_steps // lc.rounds)
    rng = random.Random(cfg.train.seed)
    current, final = str(student_dir), {}
    for r in range(1, lc.rounds + 1):
        chosen = sorted(rng.sample(range(len(data.train)), max(1, round(lc.lmbda * len(data.train)))))
        prompts = [data.train[i].prompt for i in chosen]
        with VLLMEnginePool(current, cfg.teacher.engine, name="student") as pool:
            sampling = SamplingConfig(temperature=cfg.teacher.sampling.temperature or 1.0, max_tokens=cfg.teacher.sampling.max_tokens,
                                      seed=cfg.train.seed + r)
            samples = [c.text for c in pool.generate(data.render_for_engine(prompts), sampling)]
        on_policy, _ = encode_examples(cfg, tokenizer, [(p, s, "response") for p, s in zip(prompts, samples, strict=True) if s.strip()],
                                       "on-policy samples")
        with LazyTeacherPool(cfg) as tpool:  # no engine when this round's top-k is cached (a resumed job)
            on_policy = with_topk(cfg, on_policy, store.local, tpool, tag=f"topk_round_{r}")
        store.push("teacher")
        replaced = set(chosen)  # each item knows its prompt: the sampled ones are replaced by the student's answers
        rdata = data.replace(train=[it for i, it in enumerate(data.train) if i not in replaced] + on_policy)
        rcfg = round_config(cfg, None if r == lc.rounds else f"round_{r}", max_steps=steps)
        print(f"[{cfg.name}] on-policy round {r}/{lc.rounds}: {len(on_policy)} student samples scored by the teacher", flush=True)
        final = train(rcfg, rdata, current, None)
        current = f"{rcfg.output_dir}/model"  # a path or a URI: the next round's engine and workers resolve it
    store.close()
    return final


METHOD = Method(build_data=build_data, build_model=build_model, rounds=rounds)
