"""Every distillation method on tiny models with 2 Ray Train workers: the loss goes down and the
exported model/ loads in vLLM. step_by_step's unlabelled rows get their labels (and every row its
rationale) from a real teacher served by the vLLM pool: the tiny model tuned here on worked
arithmetic answers ("17 + 72 = 89. So the answer is 89.")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayapp.config import load_job
from rayapp.data.readers import read_jsonl

pytestmark = [pytest.mark.integration]  # ~6-9 min on 2 cores; part of make test
ROOT = Path(__file__).resolve().parents[2]
FAST = ["train.eval_every=4", "train.checkpoint_every=8", "evaluation.max_examples=8", "evaluation.max_new_tokens=16",
        "teacher.engine.max_model_len=128", "teacher.engine.cpus_per_engine=1"]


def _metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def _assert_trained(out: Path, key: str | None = None) -> None:
    rows = _metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    if key:
        assert key in rows[-1], rows[-1]
    for name in ("config.resolved.yaml", "eval.json", "report.html", "model/config.json"):
        assert (out / name).exists(), name


@pytest.fixture(scope="module")
def tuned_teacher(tmp_path_factory) -> Path:
    """The tiny model tuned in this process on worked answers: a teacher that writes a rationale
    and 'So the answer is N.' (its answers need not be right)."""
    import torch

    from rayapp.config.base import TrainConfig
    from rayapp.data.collate import collate_sft
    from rayapp.data.sft import load_sft_dataset
    from rayapp.models.io import load_causal_lm, load_tokenizer, resolve_model, save_model_atomic
    from rayapp.training.loop import LocalReporter, count_supervised, fit
    from rayapp.training.sft import sft_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 threads on a busy 2-core machine (restored below)
    tok = load_tokenizer(resolve_model("tiny"))
    model = load_causal_lm(resolve_model("tiny"))
    data = load_sft_dataset(ROOT / "data/sft_tiny/train.jsonl", tok, None, 64)
    try:
        fit(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3), train_items=data.examples, val_items=None,
            collate=lambda it: collate_sft(it, tok.pad_token_id), count_fn=count_supervised, loss_fn=sft_loss,
            cfg=TrainConfig(max_steps=TEACHER_STEPS, global_batch_size=16, micro_batch_size=16, learning_rate=3e-3, checkpoint_every=10_000, log_every=50),
            micro_batch_size=16, reporter=LocalReporter())
    finally:
        torch.set_num_threads(threads)  # the rest of the session keeps its own setting
    return save_model_atomic(model, tok, tmp_path_factory.mktemp("teacher") / "model")


TEACHER_STEPS = 160


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_model_dir, tmp_path_factory):
    """One vLLM engine with the 1-layer student architecture; each test reloads its exported weights into it."""
    from rayapp.config.base import EngineConfig
    from rayapp.models.student import from_teacher_layers
    from rayapp.teachers.pool import VLLMEnginePool

    arch = from_teacher_layers(tiny_model_dir, tmp_path_factory.mktemp("arch") / "model", keep_every=2)
    pool = VLLMEnginePool(arch, EngineConfig(num_engines=1, max_model_len=128, max_num_seqs=8, kv_cache_gib=1), name="check")
    yield pool
    pool.shutdown()


def _loads_in_vllm(engine, model_dir: Path) -> None:
    """The engine, loaded with the exported weights, computes what transformers computes from
    the same directory: each token's log-prob given its prefix (any other weights fail this)."""
    engine.update_weights(str(model_dir))
    _engine_matches_transformers(engine, model_dir)


def _engine_matches_transformers(engine, model_dir: Path) -> None:
    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer

    ids = load_tokenizer(str(model_dir)).encode("What is 12 + 30? 12 + 30 = 42. So the answer is 42.")
    served = torch.tensor(engine.score([ids])[0])
    model = load_causal_lm(str(model_dir)).eval()
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    local = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(served, local, atol=2e-2), (served - local).abs().max()


def test_step_by_step_labels_unlabelled_rows_with_the_teacher_pool(ray_cluster, tuned_teacher, engine, tmp_path):
    from rayapp import kinds
    from rayapp.training.distill.recipe import run
    from tests.unit.test_tracking import assert_tensorboard_holds_every_series

    out = tmp_path / "sbs"
    cfg = load_job(ROOT / "jobs/distill_step_by_step.yaml", [
        f"output_dir={out}", f"teacher.path={tuned_teacher}", "train.max_steps=8", "student.init=from_teacher_layers",
        "evaluation.teacher=true", "report_to=[tensorboard]", *FAST])
    summary = kinds.run(cfg)  # as `rayapp run` does: live tracking for distill
    _assert_trained(out, "rationale_loss")
    assert_tensorboard_holds_every_series(out, "distill")
    teacher_rows = read_jsonl(out / "teacher" / "rationales" / "output.jsonl")  # written by the kind: batch code
    inputs = read_jsonl(ROOT / "data/distill_tiny/train.jsonl")
    unlabelled = {r["input_text"] for r in inputs if "output_text" not in r}
    labelled_by_teacher = [r for r in teacher_rows if r["input_text"] in unlabelled]
    assert len(labelled_by_teacher) >= len(unlabelled) // 2, "the teacher labelled too few rows"
    assert all(r["label"] and r["rationale"] and r["teacher"]["model"] == str(tuned_teacher) for r in labelled_by_teacher)
    evaluation = json.loads((out / "eval.json").read_text())
    print(evaluation)
    assert "student_answer_accuracy" in evaluation and "teacher_answer_accuracy" in evaluation
    assert summary["model"] == str(out / "model")
    _loads_in_vllm(engine, out / "model")
    # A re-run reuses the cached teacher output (no engine started: no part is written again).
    shards = sorted((out / "teacher" / "rationales" / "parts").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    run(load_job(ROOT / "jobs/distill_step_by_step.yaml", [f"output_dir={out}", f"teacher.path={tuned_teacher}", "train.max_steps=8",
                                                           "student.init=from_teacher_layers", *FAST, "evaluation.max_examples=2"]))
    assert shards and [p.stat().st_mtime_ns for p in shards] == stamps


def test_logits_kd_from_vllm_top_k(ray_cluster, tuned_teacher, engine, tmp_path):
    from rayapp.training.distill.recipe import run

    out = tmp_path / "logits"
    run(load_job(ROOT / "jobs/distill_logits.yaml", [f"output_dir={out}", f"teacher.path={tuned_teacher}", "train.max_steps=8", *FAST]))
    _assert_trained(out, "kd_loss")
    topk = read_jsonl(out / "teacher" / "topk.jsonl")
    assert len(topk[0]["ids"][0]) == 20 and all(lp <= 0 for lp in topk[0]["logprobs"][0])
    _loads_in_vllm(engine, out / "model")


def test_relations_and_born_again_self(ray_cluster, tuned_teacher, engine, tmp_path, capsys):
    from rayapp.training.distill.recipe import run

    out = tmp_path / "rel"
    run(load_job(ROOT / "jobs/distill_relations.yaml", [f"output_dir={out}", f"teacher.path={tuned_teacher}", "train.max_steps=8", *FAST]))
    _assert_trained(out, "relation_loss")
    _loads_in_vllm(engine, out / "model")

    out = tmp_path / "self"
    run(load_job(ROOT / "jobs/distill_self.yaml", [f"output_dir={out}", "student.init=from_teacher_layers", "teacher.path=tiny",
                                                   "train.max_steps=4", *FAST]))
    _assert_trained(out, "kd_loss")
    assert (out / "round_1" / "model" / "config.json").exists()  # generation 1 taught generation 2
    printed = capsys.readouterr().out
    assert f"born-again round 2/2: teacher {out}/round_1/model" in printed, printed[-2000:]
    _loads_in_vllm(engine, out / "model")


def test_features_with_a_narrower_student_learns_a_projection(ray_cluster, tiny_model_dir, tuned_teacher, tmp_path):
    """Student width 64 vs teacher 128: the projector is a real Linear(64, 128); model/ loads in vLLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayapp.config.base import EngineConfig
    from rayapp.models.io import load_tokenizer, save_model_atomic
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.training.distill.recipe import run

    tok = load_tokenizer(tiny_model_dir)
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    student = save_model_atomic(narrow, tok, tmp_path / "narrow")
    out = tmp_path / "feat"
    run(load_job(ROOT / "jobs/distill_features.yaml", [f"output_dir={out}", f"model.path={student}", "student.init=from_model",
                                                       f"teacher.path={tuned_teacher}", "train.max_steps=8", *FAST]))
    _assert_trained(out, "feature_loss")
    rows = _metrics(out)
    assert rows[-1]["feature_loss"] < rows[0]["feature_loss"], [r["feature_loss"] for r in rows]
    with VLLMEnginePool(out / "model", EngineConfig(max_model_len=128, max_num_seqs=4, kv_cache_gib=1), name="check") as pool:
        _engine_matches_transformers(pool, out / "model")


def test_logits_kd_over_teacher_written_responses_with_an_on_policy_round(ray_cluster, tuned_teacher, engine, tmp_path,
                                                                         monkeypatch, capsys):
    """logits.responses: teacher: the student is trained on what the teacher engine writes greedily
    (the same text transformers generates from the teacher), not on the rows' output_text; with
    logits.lmbda > 0 (on-policy GKD, one round) a lmbda share of those prompts is answered instead by
    the student's own samples, scored by the teacher, and trained on. The KD loss falls."""
    from rayapp import evaluation
    from rayapp.models.io import load_tokenizer
    from rayapp.training.distill import logits
    from rayapp.training.distill.recipe import run

    encoded = []  # (source, [(prompt, response)]) of every set of examples the job tokenized
    original = logits.encode_examples

    def recording(cfg, tokenizer, triples, source):
        encoded.append((source, [(p, r) for p, r, _ in triples]))
        return original(cfg, tokenizer, triples, source)

    monkeypatch.setattr(logits, "encode_examples", recording)
    out, n_rows, max_tokens = tmp_path / "resp", 16, 24
    run(load_job(ROOT / "jobs/distill_logits.yaml", [
        f"output_dir={out}", f"teacher.path={tuned_teacher}", "data.train=data/distill_tiny/train.jsonl", f"data.max_rows={n_rows}",
        "logits.responses=teacher", "logits.lmbda=0.25", "logits.rounds=1", f"teacher.sampling.max_tokens={max_tokens}",
        "train.max_steps=8", *FAST]))
    _assert_trained(out, "kd_loss")

    inputs = read_jsonl(ROOT / "data/distill_tiny/train.jsonl")[:n_rows]
    prompts = [r["input_text"] for r in inputs]
    written = read_jsonl(out / "teacher" / "responses.jsonl")
    assert [r["input_text"] for r in written] == prompts
    # The teacher's greedy answers, as transformers writes them from the same directory and chat template.
    hf = evaluation.generate_transformers(tuned_teacher, evaluation.render_prompts(load_tokenizer(str(tuned_teacher)), prompts), max_tokens)
    same = sum(r["output_text"].strip() == h.strip() for r, h in zip(written, hf, strict=True))
    assert same >= n_rows - 1, list(zip([r["output_text"] for r in written], hf, strict=True))
    # What the student trained on: the teacher's responses, not the rows' own output_text.
    source, pairs = encoded[0]
    assert source.endswith("distill_tiny/train.jsonl")
    assert pairs == [(r["input_text"], r["output_text"]) for r in written if r["output_text"].strip()]
    given = {r["input_text"]: r["output_text"] for r in inputs if "output_text" in r}
    assert given and all(resp != given[p] for p, resp in pairs if p in given)
    # The on-policy round: a lmbda share of the prompts, answered by the student, scored by the teacher.
    source, samples = encoded[1]
    assert source == "on-policy samples" and 1 <= len(samples) <= round(0.25 * len(pairs)), samples
    teacher_said = dict(pairs)
    assert all(p in teacher_said for p, _ in samples)
    assert sum(s != teacher_said[p] for p, s in samples) >= 1, samples  # the student's own answers
    assert len(read_jsonl(out / "teacher" / "topk_round_1.jsonl")) == len(samples)
    assert f"on-policy round 1/1: {len(samples)} student samples scored by the teacher" in capsys.readouterr().out
    _loads_in_vllm(engine, out / "model")
