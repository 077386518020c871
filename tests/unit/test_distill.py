"""Distillation around the maths: config checks, the two-task batch, collation, per-method losses
in one process (the shared loop with a LocalReporter), student layer selection, answer matching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rayapp.config.loader import ConfigError, load_job_dict

ROOT = Path(__file__).resolve().parents[2]


def _job(**kw) -> dict:
    base = {"kind": "distill", "model": {"path": "tiny", "max_seq_len": 64}, "task_type": "number",
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 2}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def _teacher_file(tmp_path, n=6) -> Path:
    rows = []
    for i in range(n):
        a, b = 10 + i, 20 + 2 * i
        rows.append({"input_text": f"What is {a} + {b}?", "label": str(a + b), "rationale": f"{a} + {b} = {a + b}.",
                     "teacher": {"model": "t", "template": "cot@x", "sampling": {}}})
    p = tmp_path / "teacher.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# -- config ---------------------------------------------------------------------------------------

def test_config_errors_name_the_fields():
    with pytest.raises(ConfigError, match="teacher.path is missing but method: features"):
        load_job_dict(_job(method="features"))
    with pytest.raises(ConfigError, match="micro_batch_size >= 3"):
        load_job_dict(_job(method="relations", teacher={"path": "tiny"}, relations={"loss": "rkd_angle"},
                           train={"micro_batch_size": 2, "global_batch_size": 8}))
    with pytest.raises(ConfigError, match="self.teacher: frozen"):
        load_job_dict(_job(method="self", **{"self": {"teacher": "ema", "rounds": 2}}))
    with pytest.raises(ConfigError, match="rationale_weight"):
        load_job_dict(_job(step_by_step={"rationale_weight": 1.5}))
    cfg = load_job_dict(_job(method="self", **{"self": {"rounds": 2}}))
    assert cfg.self_.rounds == 2  # `self:` in YAML, `self_` in Python


# -- step_by_step data ----------------------------------------------------------------------------

def test_two_task_batch_construction(tmp_path, tiny_tokenizer):
    from rayapp.training.distill.data import collate_distill
    from rayapp.training.distill.step_by_step import build_data

    cfg = load_job_dict(_job(teacher={"outputs": str(_teacher_file(tmp_path))}, output_dir=str(tmp_path / "o")))
    data = build_data(cfg, tiny_tokenizer, tmp_path / "o")
    assert len(data.train) == 12 and [it.is_rationale for it in data.train[:2]] == [False, True]
    label_item, rationale_item = data.train[0], data.train[1]
    decoded = tiny_tokenizer.decode(label_item.input_ids)
    assert "predict: What is 10 + 20?" in decoded
    assert "explain: What is 10 + 20?" in tiny_tokenizer.decode(rationale_item.input_ids)
    target = tiny_tokenizer.decode([t for t in label_item.labels if t != -100])
    assert target.startswith("30") and "predict" not in target
    rationale = tiny_tokenizer.decode([t for t in rationale_item.labels if t != -100])
    assert rationale.startswith("10 + 20 = 30.") and "So the answer is 30." in rationale  # explain_target: rationale_and_label
    paper = load_job_dict(_job(teacher={"outputs": str(_teacher_file(tmp_path))}, step_by_step={"explain_target": "rationale"}))
    paper_item = build_data(paper, tiny_tokenizer, tmp_path / "o").train[1]
    assert "So the answer is" not in tiny_tokenizer.decode([t for t in paper_item.labels if t != -100])
    n_label = sum(sum(1 for t in it.labels if t != -100) for it in data.train if not it.is_rationale)
    n_all = sum(sum(1 for t in it.labels if t != -100) for it in data.train)
    assert data.p_label == pytest.approx(n_label / n_all) and data.p_rationale == pytest.approx(1 - n_label / n_all)
    batch = collate_distill(data.train[:4], tiny_tokenizer.pad_token_id)
    assert batch["is_rationale"].tolist() == [False, True, False, True]
    assert batch["input_ids"].shape == batch["labels"].shape

    standard = load_job_dict(_job(teacher={"outputs": str(_teacher_file(tmp_path))}, step_by_step={"rationale_weight": 0.0}))
    data0 = build_data(standard, tiny_tokenizer, tmp_path / "o")
    assert len(data0.train) == 6 and not any(it.is_rationale for it in data0.train) and data0.p_label == 1.0


def test_rows_that_need_the_teacher_are_reported_by_validate(tmp_path, tiny_tokenizer):
    from rayapp.training.distill.step_by_step import build_data

    train = tmp_path / "in.jsonl"
    train.write_text('{"input_text": "What is 1 + 2?", "output_text": "3"}\n{"input_text": "What is 2 + 2?"}\n')
    cfg = load_job_dict(_job(data={"train": str(train)}, step_by_step={"rationale_weight": 0.0}))
    data = build_data(cfg, tiny_tokenizer, tmp_path, dry=True)
    assert "1 of 2 rows need the teacher (labels)" in data.describe()


def test_bad_teacher_rows_name_file_line_and_field(tmp_path, tiny_tokenizer):
    from rayapp.data.loaders import DataError
    from rayapp.training.distill.step_by_step import build_data

    p = tmp_path / "t.jsonl"
    p.write_text('{"input_text": "q", "label": "1", "rationale": "r"}\n')
    cfg = load_job_dict(_job(teacher={"outputs": str(p)}))
    with pytest.raises(DataError, match=r"t.jsonl:1: teacher: missing"):
        build_data(cfg, tiny_tokenizer, tmp_path)


# -- losses ---------------------------------------------------------------------------------------

class _Const(torch.nn.Module):
    """Returns fixed logits; 'training' toggles like a real model."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids=None, attention_mask=None):
        return (self.logits, [])


def test_step_by_step_loss_is_alpha_weighted_task_means():
    from rayapp.algorithms.sft import token_nll_sum
    from rayapp.training.distill.step_by_step import loss as step_by_step_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[-100, -100, 1, 2, -100], [-100, 3, 4, 5, 6], [-100, -100, -100, 0, 1]])
    is_rat = torch.tensor([False, True, False])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels, "is_rationale": is_rat}
    lab, rat = labels.clone(), labels.clone()
    lab[1] = -100
    rat[[0, 2]] = -100
    ls, ln = token_nll_sum(logits, lab)
    rs, rn = token_nll_sum(logits, rat)
    n = int(ln + rn)
    alpha = 0.3
    # the batch holds the tasks in the data's proportion: the loss is exactly alpha * mean_l + (1 - alpha) * mean_r
    parts = step_by_step_loss(alpha, float(ln) / n, float(rn) / n)(_Const(logits), batch)
    assert parts.count == n
    assert float(parts.loss_sum.detach()) / n == pytest.approx(alpha * float(ls / ln) + (1 - alpha) * float(rs / rn), rel=1e-5)
    model = _Const(logits).eval()  # validation: plain NLL
    parts = step_by_step_loss(alpha, 0.5, 0.5)(model, batch)
    assert float(parts.loss_sum.detach()) == pytest.approx(float(ls + rs), rel=1e-5)


def test_response_mask_counts_the_nll_tokens_and_collate_pads_topk():
    from rayapp.algorithms.sft import response_mask
    from rayapp.training.distill.data import DistillItem, collate_distill

    items = [DistillItem([5, 6, 7, 8], [-100, -100, 7, 8], topk_ids=[[1, 2]] * 3, topk_logprobs=[[-0.1, -2.0]] * 3),
             DistillItem([5, 6], [-100, 6], topk_ids=[[3, 4]], topk_logprobs=[[-0.5, -1.0]])]
    b = collate_distill(items, pad_id=0)
    assert b["topk_ids"].shape == (2, 4, 2) and b["topk_logprobs"][1, 0].tolist() == [-0.5, -1.0]
    assert b["topk_logprobs"][1, 3].tolist() == pytest.approx([-math.log(2)] * 2)
    m = response_mask(b["labels"])
    assert m.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert int(m.sum()) == int((b["labels"][:, 1:] != -100).sum())


def test_topk_from_scores_keeps_k_distinct_sorted():
    from rayapp.training.distill.teacher import topk_from_scores

    ids, lps = topk_from_scores([{4: -3.0, 1: -0.2, 9: -1.0}, {2: -0.1, 3: -0.5}], 2)
    assert ids == [[1, 9], [2, 3]] and lps == [[-0.2, -1.0], [-0.1, -0.5]]


def _small_lm(hidden=64, layers=2, vocab=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64))


def _items(n=16):
    from rayapp.training.distill.data import DistillItem

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(3, 32, (8,), generator=g).tolist()
        out.append(DistillItem(x, [-100] * 4 + x[4:]))
    return out


@pytest.mark.parametrize("method", ["features", "relations", "self_frozen", "self_ema"])
def test_in_worker_teacher_methods_lower_their_loss(method):
    from rayapp.algorithms.features import FeatureProjector, uniform_layer_map
    from rayapp.config.base import TrainConfig
    from rayapp.config.distill import FeaturesConfig, RelationsConfig, SelfDistillConfig
    from rayapp.training.distill import features, relations, self_distill
    from rayapp.training.distill.data import collate_distill
    from rayapp.training.distill.method import DistillStudent, ema_update
    from rayapp.training.loop import LocalReporter, count_supervised, evaluate, fit

    teacher = _small_lm(hidden=128, layers=2, seed=1).eval().requires_grad_(False)
    student = _small_lm(hidden=64, layers=1, seed=2)
    if method == "features":
        layer_map = uniform_layer_map(1, 2)
        model = DistillStudent(student, FeatureProjector(64, 128, len(layer_map)), [s for s, _ in layer_map])
        loss_fn = features.loss(FeaturesConfig(), teacher, layer_map)
        key = "feature_loss"
    elif method == "relations":
        model = DistillStudent(student, None, [-1])
        loss_fn = relations.loss(RelationsConfig(weight=100.0, task_weight=0.01), teacher, 2)
        key = "relation_loss"
    else:
        teacher = _small_lm(hidden=64, layers=1, seed=3).eval().requires_grad_(False)
        model = student
        loss_fn = self_distill.loss(SelfDistillConfig(task_weight=0.0), teacher)
        key = "kd_loss"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    if method == "self_ema":
        before = [p.clone() for p in teacher.parameters()]
        optimizer.register_step_post_hook(lambda *_: ema_update(teacher, student, 0.5))
    items = _items(8)

    def collate(it):
        return collate_distill(it, 0)

    start = evaluate(model, items, collate, count_supervised, loss_fn, 4)
    fit(model=model, optimizer=optimizer, train_items=items, val_items=items, collate=collate,
        count_fn=count_supervised, loss_fn=loss_fn, cfg=TrainConfig(max_steps=10, global_batch_size=8, micro_batch_size=4,
        learning_rate=3e-3, warmup_ratio=0.0, eval_every=10, checkpoint_every=100), micro_batch_size=4, reporter=LocalReporter())
    end = evaluate(model, items, collate, count_supervised, loss_fn, 4)
    assert end["val_loss"] < start["val_loss"], (start, end)
    assert end[f"val_{key}"] < start[f"val_{key}"], (start, end)
    if method == "self_ema":
        assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


# -- student initialisation -----------------------------------------------------------------------

def test_kept_layers_and_renumbering():
    from rayapp.models.student import StudentInitError, kept_layers, select_layer_weights

    assert kept_layers(6, 2) == [1, 3, 5] and kept_layers(2, 2) == [1] and kept_layers(4, 1) == [0, 1, 2, 3]
    assert kept_layers(6, layers=[4, 0]) == [0, 4]
    with pytest.raises(StudentInitError, match="0..5"):
        kept_layers(6, layers=[6])
    state = {"model.embed_tokens.weight": 0, "model.layers.0.a": 1, "model.layers.1.a": 2, "model.layers.10.a": 3, "lm_head.weight": 4}
    assert select_layer_weights(state, [1, 10]) == {"model.embed_tokens.weight": 0, "model.layers.0.a": 2, "model.layers.1.a": 3, "lm_head.weight": 4}


def test_from_teacher_layers_copies_the_kept_layers(tmp_path, tiny_model_dir):
    from rayapp.models.io import load_causal_lm
    from rayapp.models.student import from_teacher_layers

    out = from_teacher_layers(tiny_model_dir, tmp_path / "student", keep_every=2)
    s, t = load_causal_lm(str(out)), load_causal_lm(str(tiny_model_dir))
    assert s.config.num_hidden_layers == 1 and (out / "tokenizer.json").exists()
    assert torch.equal(s.model.layers[0].self_attn.q_proj.weight, t.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)


# -- answer matching ------------------------------------------------------------------------------

def test_score_answers_uses_the_task_matcher(tmp_path):
    from rayapp.evaluation import load_eval_rows, score_answers

    rows = [{"input_text": "q1", "label": "12"}, {"input_text": "q2", "label": "7"}, {"input_text": "q3", "label": "3"}]
    r = score_answers(rows, ["12.0", "so 7 apples", "4"], "number", "answer")
    assert (r["correct"], r["n"]) == (2, 3) and r["accuracy"] == pytest.approx(2 / 3)
    r = score_answers(rows, ["1 + 11 = 12. So the answer is 12.", "no marker 7", "x"], "number", "rationale")
    assert r["correct"] == 1
    r = score_answers(rows, ["So the answer is 12.", "7", "x"], "number", "auto")
    assert r["correct"] == 2
    choice = [{"input_text": "q", "label": "(B)"}]
    assert score_answers(choice, ["B) cupboard"], "choice")["correct"] == 1
    p = tmp_path / "val.jsonl"
    p.write_text('{"input_text": "What is 1 + 2?", "output_text": "1 + 2 = 3. So the answer is 3."}\n')
    assert load_eval_rows(p, task_type="number") == [{"input_text": "What is 1 + 2?", "label": "3"}]


@pytest.mark.parametrize("chat, expect_messages", [("auto", True), ("always", True), ("never", False)])
def test_teacher_prompts_follow_teacher_chat(tiny_model_dir, chat, expect_messages):
    """teacher.chat decides whether rationale prompts go through the teacher's chat template
    (the tiny model has one, so 'auto' uses it)."""
    from rayapp.training.distill.teacher import rationale_prompt

    cfg = load_job_dict(_job(teacher={"path": "tiny", "chat": chat}))
    prompt = rationale_prompt(cfg, str(tiny_model_dir))("What is 2 + 3?")
    assert isinstance(prompt, list) == expect_messages
    assert "What is 2 + 3?" in (prompt[-1]["content"] if expect_messages else prompt)


def test_teacher_cache_key_changes_when_the_teacher_is_retrained_in_place(tmp_path):
    """A teacher re-trained into the same directory must not reuse the old teacher's cached output."""
    import os

    from rayapp.models.io import model_stamp
    from rayapp.training.distill.teacher import fingerprint

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"old weights")
    before = fingerprint(model_stamp(str(tmp_path)), "template", ["What is 1 + 2?"])
    assert fingerprint(model_stamp(str(tmp_path)), "template", ["What is 1 + 2?"]) == before
    weights.write_bytes(b"new weights")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert fingerprint(model_stamp(str(tmp_path)), "template", ["What is 1 + 2?"]) != before


# -- teacher settings that must be honoured --------------------------------------------------------

def test_teacher_rationales_parse_answers_as_the_jobs_task_type():
    """teacher.rationales.task_type follows task_type (templates and the rationale parser use it);
    a different value is refused, naming both fields."""
    cfg = load_job_dict(_job(task_type="choice"))
    assert cfg.teacher.rationales.task_type == "choice"
    with pytest.raises(ConfigError, match=r"teacher.rationales.task_type \(yesno\) differs from task_type \(number\)"):
        load_job_dict(_job(teacher={"rationales": {"task_type": "yesno"}}))
    assert load_job_dict(_job(teacher={"rationales": {"task_type": "number"}})).teacher.rationales.task_type == "number"


def test_self_consistency_needs_sampling_in_distill_too():
    """As for kind: batch: n rationales per question at temperature 0 are n copies."""
    with pytest.raises(ConfigError, match="teacher.rationales.self_consistency_n is 3 but teacher.sampling.temperature is 0"):
        load_job_dict(_job(teacher={"rationales": {"self_consistency_n": 3}}))
    cfg = load_job_dict(_job(teacher={"rationales": {"self_consistency_n": 3}, "sampling": {"temperature": 0.7}}))
    assert cfg.teacher.rationales.self_consistency_n == 3


class _RecordingTeacher:
    """A Generator that answers every prompt with 'ok' and keeps what it was sent."""

    def __init__(self):
        self.sent = []

    def generate(self, prompts, sampling):
        from rayapp.teachers import Completion

        self.sent += prompts
        return [Completion(text="ok", token_ids=[1], finish_reason="stop", prompt_index=i) for i in range(len(prompts))]


@pytest.mark.parametrize("chat, expect_messages", [("auto", True), ("always", True), ("never", False)])
def test_teacher_responses_follow_teacher_chat(tmp_path, chat, expect_messages):
    """logits.responses: teacher sends prompts as user turns only when teacher.chat says so (the tiny
    teacher has a chat template, so 'auto' uses it)."""
    from rayapp.training.distill.teacher import teacher_responses

    cfg = load_job_dict(_job(method="logits", teacher={"path": "tiny", "chat": chat}, logits={"responses": "teacher"}))
    teacher = _RecordingTeacher()
    assert teacher_responses(cfg, ["What is 2 + 3?"], tmp_path, pool=teacher) == ["ok"]
    assert isinstance(teacher.sent[0], list) == expect_messages


def test_logits_items_know_the_prompt_they_answer(tmp_path, tiny_tokenizer):
    """On-policy GKD replaces the responses of sampled prompts: each item carries its prompt, also
    when rows are dropped or split off for validation (no guessing from lengths)."""
    from rayapp.training.distill import logits

    rows = [{"input_text": f"What is {i} + 1?", "output_text": str(i + 1)} for i in range(6)]
    rows.insert(2, {"input_text": "no answer"})  # a bad row, dropped
    rows.append({"messages": [{"role": "user", "content": "chat question"}, {"role": "assistant", "content": "chat answer"}]})
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_job_dict(_job(method="logits", teacher={"path": "tiny"}, data={"train": str(train), "on_bad_rows": "drop",
                                                                              "validation_split": 0.25}))
    data = logits.build_data(cfg, tiny_tokenizer, tmp_path, dry=True)
    items = data.train + data.val
    assert len(items) == 7 and len(data.val) == 2
    for it in items:
        text = tiny_tokenizer.decode(it.input_ids)
        assert it.prompt in text
        answer = tiny_tokenizer.decode([t for t in it.labels if t != -100])
        expected = "chat answer" if it.prompt == "chat question" else str(int(it.prompt.split()[2]) + 1)
        assert answer.startswith(expected)


class _CountingTeacher:
    """A teacher pool stand-in: answers prompt i with 'teacher answer i', scores with a fixed top-k."""

    starts = 0

    def __init__(self, *a, **kw):
        type(self).starts += 1

    def generate(self, prompts, sampling):
        from rayapp.teachers import Completion

        return [Completion(text=f"teacher answer {i}", token_ids=[1], finish_reason="stop", prompt_index=i) for i in range(len(prompts))]

    def score(self, sequences, top_k=0):
        return [[{t: -0.1 * (t + 1) for t in range(top_k)} for _ in s[1:]] for s in sequences]

    def shutdown(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_teacher_written_responses_share_one_engine_and_a_rerun_starts_none(tmp_path, tiny_tokenizer, monkeypatch):
    """logits.responses: teacher trains on what the teacher wrote (not the rows' output_text); the
    responses and their top-k come from one teacher engine (they had two starts, ~30 s each), and a
    re-run that finds both cached in output_dir/teacher/ starts no engine at all (it started one)."""
    from rayapp.training.distill import logits, teacher

    rows = [{"input_text": f"What is {i} + 1?", "output_text": str(i + 1)} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_job_dict(_job(method="logits", teacher={"path": "tiny"}, logits={"responses": "teacher", "top_k": 4},
                             data={"train": str(tmp_path / "train.jsonl")}, output_dir=str(tmp_path / "o")))
    monkeypatch.setattr(teacher, "teacher_pool", lambda cfg, name="teacher": _CountingTeacher())
    _CountingTeacher.starts = 0
    data = logits.build_data(cfg, tiny_tokenizer, tmp_path / "o")
    assert _CountingTeacher.starts == 1
    targets = {it.prompt: tiny_tokenizer.decode([t for t in it.labels if t != -100]) for it in data.train}
    assert sorted(targets) == sorted(r["input_text"] for r in rows)
    assert all(targets[f"What is {i} + 1?"].startswith(f"teacher answer {i}") for i in range(5)), targets
    assert all(len(it.topk_ids) == len(it.input_ids) - 1 and len(it.topk_ids[0]) == 4 for it in data.train)
    again = logits.build_data(cfg, tiny_tokenizer, tmp_path / "o")
    assert _CountingTeacher.starts == 1  # everything read from output_dir/teacher/
    assert [it.topk_ids for it in again.train] == [it.topk_ids for it in data.train]


def test_teacher_sections_given_in_part_keep_the_teachers_defaults():
    """`teacher.sampling.max_tokens=24` (or a `sampling:` block without temperature) kept the teacher
    greedy? It sampled at SamplingConfig's 0.7: the given block replaced the greedy default whole.
    Likewise teacher.engine and evaluate's engine keep max_model_len 512."""
    cfg = load_job_dict(_job(method="logits", teacher={"path": "tiny", "sampling": {"max_tokens": 24}, "engine": {"cpus_per_engine": 2}}))
    assert (cfg.teacher.sampling.temperature, cfg.teacher.sampling.max_tokens) == (0.0, 24)
    assert (cfg.teacher.engine.max_model_len, cfg.teacher.engine.cpus_per_engine) == (512, 2)
    cfg = load_job_dict(_job(method="logits", teacher={"path": "tiny", "sampling": {"temperature": 0.9}}))
    assert (cfg.teacher.sampling.temperature, cfg.teacher.sampling.max_tokens) == (0.9, 128)
    assert load_job_dict(_job(method="logits", teacher={"path": "tiny"})).teacher.sampling.temperature == 0.0
    ev = load_job_dict({"kind": "evaluate", "models": [{"name": "m", "path": "tiny"}], "engine": {"num_engines": 2}})
    assert (ev.engine.max_model_len, ev.engine.num_engines) == (512, 2)
