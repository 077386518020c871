"""`kind: distill` — train a student to mimic a teacher; ``method`` picks how (``METHODS``).

Reads top to bottom: build the student (model.path, or a layer subset of the teacher), build the
method's data on the driver (teacher output computed here with vLLM and cached under
output_dir/teacher/: rationales for step_by_step, top-k log-probs for logits), train on Ray Train
workers with the shared step loop (the frozen teacher of features / relations / self lives inside
each worker, transformers, no_grad), in rounds for the methods that have them, export model/,
measure answer accuracy on held-out rows, then the shared ending: eval.json, report.html, deploy
if asked. The maths: ``rayapp.algorithms``.

``run(cfg, in_process=True)`` trains in this process instead of on Ray Train workers
(bench/distill_quality.py).

Storage: everything goes through the job's output store. Teacher caches live in its local
directory (``store.local / "teacher"``: pulled from output_dir first, so a re-run of a job at an
``s3://`` URI reuses them, and pushed once built); a student built from the teacher's layers is
published as ``student_init/`` so that workers on any node can load it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from rayapp.training.distill import features, logits, on_policy, relations, self_distill, step_by_step
from rayapp.training.distill.data import DistillData, collate_distill, eval_rows
from rayapp.training.distill.method import Method
from rayapp.training.distill.teacher import rationale_prompt, teacher_model_dir
from rayapp.training.launch import build_model, launch, worker_context
from rayapp.training.loop import count_supervised
from rayapp.training.outputs import export_model, finish, prepare_output

METHODS: dict[str, Method] = {
    "step_by_step": step_by_step.METHOD,
    "logits": logits.METHOD,
    "features": features.METHOD,
    "relations": relations.METHOD,
    "self": self_distill.METHOD,
    "on_policy": on_policy.METHOD,
}
SUMMARY = ("reverse_kl_first", "reverse_kl_last", "tokens_trained")  # what on_policy's rounds add to the final metrics
CURVES = {"loss": "training loss", "val_loss": "validation loss", "label_loss": "label task", "rationale_loss": "rationale task",
          "kd_loss": "KD", "feature_loss": "features", "relation_loss": "relations", **on_policy.CURVES}


def validate(cfg) -> str:
    """Config and data checks without training or starting a teacher engine."""
    from rayapp.models.io import load_tokenizer, resolve_model

    teacher_dir = teacher_model_dir(cfg)  # a missing teacher fails here, as it would at `rayapp run`
    model_dir = resolve_model(cfg.model.path) if cfg.student.init == "from_model" else teacher_dir
    tokenizer = load_tokenizer(str(model_dir), cfg.model.trust_remote_code)
    return METHODS[cfg.method].build_data(cfg, tokenizer, Path(cfg.output_dir), dry=True).describe()


def distill_worker(config: dict) -> None:
    """Runs on every Ray Train worker (or in this process)."""
    from rayapp.models.io import load_tokenizer

    w = worker_context(config)
    cfg, data = w.cfg, w.payload
    tokenizer = load_tokenizer(data["student_dir"])
    trainable = METHODS[cfg.method].build_model(cfg, build_model(data["student_dir"], cfg), data, w.device)
    model = w.prepare(trainable.model)
    pad_id, capacity = tokenizer.pad_token_id, (cfg.model.max_seq_len if cfg.train.packing else None)
    w.fit(model, train_items=data["train"], val_items=data["val"], collate=lambda items: collate_distill(items, pad_id, capacity),
          count_fn=count_supervised, loss_fn=trainable.loss_fn, after_step=trainable.after_step, extra_modules=trainable.extra_modules)
    export_model(trainable.export or model, tokenizer, cfg, w)


def train(cfg, data: DistillData, student_dir: str | Path, teacher_dir: str | None, in_process: bool = False) -> dict:
    """One training run of the workers on ``data``; returns the metrics reported last.
    ``student_dir`` / ``teacher_dir``: references every worker resolves (a directory every node
    sees, a built-in name, a Hub id or an s3:// / gs:// URI)."""
    return launch(distill_worker, cfg, in_process=in_process, student_dir=str(student_dir), teacher_dir=teacher_dir,
                  train=data.train, val=data.val, p_label=data.p_label, p_rationale=data.p_rationale, layer_map=data.layer_map)


def answer_accuracy(cfg, data: DistillData, teacher_dir: str | None, store) -> dict:
    """Held-out answer accuracy of the exported student (and of the teacher when evaluation.teacher)."""
    from rayapp.evaluation import evaluate_answers

    rows = eval_rows(cfg, data)
    if not rows:
        return {}
    e = cfg.evaluation
    common = dict(task_type=cfg.task_type, max_new_tokens=e.max_new_tokens, backend=e.backend,
                  chat_template=cfg.data.chat_template, engine=cfg.teacher.engine)
    prompt_fn, extract = METHODS[cfg.method].answer(cfg)
    result = {"student": evaluate_answers(store.fetch_dir("model"), rows, prompt_fn=prompt_fn or (lambda x: x), extract=extract, **common)}
    if e.teacher and teacher_dir is not None:
        common.update(max_new_tokens=cfg.teacher.sampling.max_tokens, chat_template="auto")
        result["teacher"] = evaluate_answers(teacher_dir, rows, prompt_fn=rationale_prompt(cfg, teacher_dir), extract="rationale", **common)
    for who, r in result.items():
        print(f"[{cfg.name}] {who} answer accuracy {r['correct']}/{r['n']} = {r['accuracy']:.3f}", flush=True)
    store.write_json("answers.json", result)
    return result


def run(cfg, in_process: bool = False) -> dict:
    from rayapp.models.io import load_tokenizer, resolve_model_info
    from rayapp.models.student import build_student

    t0 = time.perf_counter()
    method = METHODS[cfg.method]
    store = prepare_output(cfg)
    out = store.local
    store.pull("teacher")  # what an earlier run of this job cached, when output_dir is a URI
    student_dir = build_student(cfg, out)
    teacher_dir = teacher_model_dir(cfg)
    if teacher_dir is None and method.teacher_defaults_to_student:
        teacher_dir = str(student_dir)
    tokenizer = load_tokenizer(str(student_dir), cfg.model.trust_remote_code)
    data = method.build_data(cfg, tokenizer, out, student_dir=student_dir, teacher_dir=teacher_dir)
    if store.path("teacher").is_dir():
        store.push("teacher")
    print(f"{cfg.name}: distill ({cfg.method})\n{data.describe()}", flush=True)  # the log only (rayapp.console)
    store.write_json("data_stats.json", data.stats)
    # What the workers load, as references any node resolves.
    if cfg.student.init == "from_model":
        student_ref = resolve_model_info(cfg.model.path).pinned_ref
    else:
        student_ref = store.publish_dir("student_init")  # the URI, or the local path itself
    teacher_ref = resolve_model_info(cfg.teacher.path, "teacher.path").pinned_ref if cfg.teacher.path else \
        (student_ref if teacher_dir is not None else None)
    train_once = partial(train, in_process=in_process)
    if method.rounds is not None:
        final = method.rounds(cfg, data, student_ref, teacher_ref, tokenizer, train_once)
    else:
        final = train_once(cfg, data, student_ref, teacher_ref)
    answers = answer_accuracy(cfg, data, teacher_dir, store)
    evaluation = {k: v for k, v in final.items() if k.startswith("val_") or k in ("loss", "step", *SUMMARY) or k.endswith("_loss")}
    for who, r in answers.items():
        evaluation[f"{who}_answer_accuracy"] = r["accuracy"]
        evaluation[f"{who}_answer_n"] = r["n"]
    return finish(cfg, evaluation, store=store, started=t0, title=f"{cfg.name} (distill: {cfg.method})", data_stats=data.stats,
                  curves=CURVES, sections=data.report_sections(answers))
