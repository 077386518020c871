"""`kind: distill` — train a student to mimic a teacher; ``method`` picks how.

Reads top to bottom: build the student (model.path, or a layer subset of the teacher), build the
data on the driver (teacher output computed here with vLLM and cached under output_dir/teacher/:
rationales for step_by_step, top-k log-probs for logits), train on Ray Train workers with the
shared step loop (the frozen teacher of features / relations / self lives inside each worker,
transformers, no_grad), export model/, measure answer accuracy on held-out rows, write eval.json
and report.html, deploy if asked. Per-method losses: ``distill_losses.py``; the maths:
``rayapp.algorithms``.

logits, on-policy (GKD, ``logits.lmbda`` > 0): done in rounds. Each round exports the student,
starts it in a vLLM engine, samples responses to a ``lmbda`` share of the prompts, has the
teacher score those tokens (top-k), and trains ``max_steps / rounds`` steps on them plus the
teacher-/given-response examples. Within a round the samples are fixed (a round is off-policy
by at most its own steps).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from rayapp.training.common import (
    check_result,
    export_model,
    fit_in_worker,
    maybe_deploy,
    prepare_for_ray,
    prepare_output,
    write_json_atomic,
)
from rayapp.training.distill_data import build_data, eval_rows, rationale_prompt
from rayapp.training.distill_teacher import teacher_model_dir

IN_WORKER_TEACHER = ("features", "relations", "self")


def validate(cfg) -> str:
    """Config and data checks without training or starting a teacher engine."""
    from rayapp.models.io import load_tokenizer, resolve_model

    teacher_dir = teacher_model_dir(cfg)  # a missing teacher fails here, as it would at `rayapp run`
    model_dir = resolve_model(cfg.model.path) if cfg.student.init == "from_model" else teacher_dir
    data = build_data(cfg, load_tokenizer(str(model_dir), cfg.model.trust_remote_code), Path(cfg.output_dir), dry=True)
    return data.describe()


def distill_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray

    from rayapp.algorithms.features import FeatureProjector
    from rayapp.config.loader import load_job_dict
    from rayapp.models.io import load_causal_lm, load_tokenizer
    from rayapp.training import distill_losses as L
    from rayapp.training.common import build_model
    from rayapp.training.launch import worker_setup

    cfg = load_job_dict(config["job"])
    env = worker_setup(cfg.resources.cpus_per_worker)
    train_items = ray.get(config["train"])
    val_items = ray.get(config["val"]) if config["val"] is not None else None
    tokenizer = load_tokenizer(config["student_dir"])
    student = build_model(config["student_dir"], cfg)
    method = cfg.method
    teacher = None
    if method in IN_WORKER_TEACHER:
        if method == "self" and cfg.self_.teacher == "ema":
            teacher = load_causal_lm(config["student_dir"], cfg.model.dtype)  # starts equal to the student
        else:
            teacher = load_causal_lm(config["teacher_dir"], cfg.teacher.dtype)
        teacher = teacher.to(env["device"]).eval().requires_grad_(False)
    if method == "features":
        layer_map = [tuple(p) for p in config["layer_map"]]
        projector = FeatureProjector(student.config.hidden_size, teacher.config.hidden_size, len(layer_map))
        model = prepare_for_ray(L.DistillStudent(student, projector, [s for s, _ in layer_map]), cfg.resources.strategy)
        loss_fn = L.features_loss(cfg.features, teacher, layer_map)
    elif method == "relations":
        model = prepare_for_ray(L.DistillStudent(student, None, [cfg.relations.student_layer]), cfg.resources.strategy)
        loss_fn = L.relations_loss(cfg.relations, teacher, 3 if cfg.relations.loss == "rkd_angle" else 2)
    else:
        model = prepare_for_ray(student, cfg.resources.strategy)
        if method == "step_by_step":
            loss_fn = L.step_by_step_loss(1.0 - cfg.step_by_step.rationale_weight, config["p_label"], config["p_rationale"])
        elif method == "logits":
            loss_fn = L.logits_loss(cfg.logits)
        else:
            loss_fn = L.self_loss(cfg.self_, teacher)
    ema = method == "self" and cfg.self_.teacher == "ema"
    if ema:
        inner = model.module if hasattr(model, "module") else model
    pad_id = tokenizer.pad_token_id
    fit_in_worker(cfg, model, train_items=train_items, val_items=val_items, collate=lambda items: L.collate_distill(items, pad_id),
                  count_fn=L.count_supervised, loss_fn=loss_fn, device=env["device"],
                  after_step=(lambda: L.ema_update(teacher, inner, cfg.self_.ema_decay)) if ema else None,
                  extra_modules={"ema_teacher": teacher} if ema else None)
    export_model(student if method in ("features", "relations") else model, tokenizer, cfg, env["rank"])


def _train(cfg, data, student_dir: Path, teacher_dir: str | None) -> dict:
    from rayapp.runtime import ensure_ray
    from rayapp.training.launch import launch

    ray = ensure_ray()
    worker_config = {
        "job": cfg.model_dump(mode="json", by_alias=True),
        "student_dir": str(student_dir),
        "teacher_dir": teacher_dir,
        "train": ray.put(data.train),
        "val": ray.put(data.val) if data.val else None,
        "p_label": data.p_label,
        "p_rationale": data.p_rationale,
        "layer_map": data.layer_map,
    }
    return check_result(launch(distill_worker, worker_config, cfg), cfg)


def _round_cfg(cfg, output_dir: Path, **train_updates):
    output_dir.mkdir(parents=True, exist_ok=True)
    update = {"output_dir": str(output_dir)}
    if train_updates:
        update["train"] = cfg.train.model_copy(update=train_updates)
    return cfg.model_copy(update=update)


def _self_rounds(cfg, data, out: Path, student_dir: Path, teacher_dir: str) -> dict:
    """Born-again: round r's frozen teacher is round r-1's student; every round starts from the same student init."""
    final: dict = {}
    for r in range(1, cfg.self_.rounds + 1):
        rcfg = cfg if r == cfg.self_.rounds else _round_cfg(cfg, out / f"round_{r}")
        print(f"[{cfg.name}] born-again round {r}/{cfg.self_.rounds}: teacher {teacher_dir}", flush=True)
        final = _train(rcfg, data, student_dir, teacher_dir)
        teacher_dir = str(Path(rcfg.output_dir) / "model")
    return final


def _on_policy_rounds(cfg, data, out: Path, student_dir: Path, tokenizer) -> dict:
    """GKD rounds (see the module docstring): sample from the latest student, teacher scores, train."""
    from rayapp.config.base import SamplingConfig
    from rayapp.teachers.pool import VLLMEnginePool
    from rayapp.training.distill_data import encode_pairs, with_topk
    from rayapp.training.distill_teacher import teacher_pool

    lc = cfg.logits
    steps = max(1, cfg.train.max_steps // lc.rounds)
    prompts = data.prompts
    rng = random.Random(cfg.train.seed)
    current, final = str(student_dir), {}
    for r in range(1, lc.rounds + 1):
        chosen = sorted(rng.sample(range(len(prompts)), max(1, round(lc.lmbda * len(prompts)))))
        with VLLMEnginePool(current, cfg.teacher.engine, name="student") as pool:
            asks = data.render_for_engine([prompts[i] for i in chosen])
            sampling = SamplingConfig(temperature=cfg.teacher.sampling.temperature or 1.0, max_tokens=cfg.teacher.sampling.max_tokens,
                                      seed=cfg.train.seed + r)
            samples = [c.text for c in pool.generate(asks, sampling)]
        on_policy = encode_pairs(cfg, tokenizer, [(prompts[i], s) for i, s in zip(chosen, samples, strict=True) if s.strip()])
        with teacher_pool(cfg) as tpool:
            on_policy = with_topk(cfg, on_policy, out, tpool, tag=f"topk_round_{r}")
        keep = [it for i, it in enumerate(data.train) if i not in set(chosen)] if len(data.train) == len(prompts) else list(data.train)
        rdata = data.replace(train=keep + on_policy)
        rcfg = _round_cfg(cfg, out if r == lc.rounds else out / f"round_{r}", max_steps=steps)
        print(f"[{cfg.name}] on-policy round {r}/{lc.rounds}: {len(on_policy)} student samples scored by the teacher", flush=True)
        final = _train(rcfg, rdata, Path(current), None)
        current = str(Path(rcfg.output_dir) / "model")
    return final


def _evaluate(cfg, data, out: Path, student_dir: Path, teacher_dir: str | None) -> dict:
    from rayapp.evaluation import evaluate_answers

    rows = eval_rows(cfg, data)
    if not rows:
        return {}
    e = cfg.evaluation
    common = dict(task_type=cfg.task_type, max_new_tokens=e.max_new_tokens, backend=e.backend,
                  chat_template=cfg.data.chat_template, engine=cfg.teacher.engine)
    result = {}
    if cfg.method == "step_by_step":
        prefix = cfg.step_by_step.predict_prefix
        result["student"] = evaluate_answers(out / "model", rows, prompt_fn=lambda x: prefix + x, extract="answer", **common)
    else:
        result["student"] = evaluate_answers(out / "model", rows, extract="auto", **common)
    if e.teacher and teacher_dir is not None:
        prompt = rationale_prompt(cfg, teacher_dir)
        common.update(max_new_tokens=cfg.teacher.sampling.max_tokens, chat_template="auto")
        result["teacher"] = evaluate_answers(teacher_dir, rows, prompt_fn=prompt, extract="rationale", **common)
    for who, r in result.items():
        print(f"[{cfg.name}] {who} answer accuracy {r['correct']}/{r['n']} = {r['accuracy']:.3f}", flush=True)
    write_json_atomic(out / "answers.json", result)
    return result


def run(cfg) -> dict:
    from rayapp.models.io import load_tokenizer
    from rayapp.models.student import build_student
    from rayapp.training.report import write_report

    t0 = time.perf_counter()
    out = prepare_output(cfg)
    student_dir = build_student(cfg, out)
    teacher_dir = teacher_model_dir(cfg)
    if cfg.method == "self" and teacher_dir is None:
        teacher_dir = str(student_dir)  # a frozen copy of the student's starting point
    tokenizer = load_tokenizer(str(student_dir), cfg.model.trust_remote_code)
    data = build_data(cfg, tokenizer, out, student_dir=student_dir, teacher_dir=teacher_dir)
    print(f"[{cfg.name}] distill ({cfg.method})\n{data.describe()}", flush=True)
    write_json_atomic(out / "data_stats.json", data.stats)
    if cfg.deploy.enabled:
        from rayapp.serving.local_head import ensure_local_head

        ensure_local_head()
    if cfg.method == "self" and cfg.self_.rounds > 1:
        final = _self_rounds(cfg, data, out, student_dir, teacher_dir)
    elif cfg.method == "logits" and cfg.logits.lmbda > 0:
        final = _on_policy_rounds(cfg, data, out, student_dir, tokenizer)
    else:
        final = _train(cfg, data, student_dir, teacher_dir)
    answers = _evaluate(cfg, data, out, student_dir, teacher_dir)
    evaluation = {k: v for k, v in final.items() if k.startswith("val_") or k in ("loss", "step") or k.endswith("_loss")}
    for who, r in answers.items():
        evaluation[f"{who}_answer_accuracy"] = r["accuracy"]
        evaluation[f"{who}_answer_n"] = r["n"]
    evaluation["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "eval.json", evaluation)
    curves = {"loss": "training loss", "val_loss": "validation loss", "label_loss": "label task", "rationale_loss": "rationale task",
              "kd_loss": "KD", "feature_loss": "features", "relation_loss": "relations"}
    report = write_report(out, title=f"{cfg.name} (distill: {cfg.method})", data_stats=data.stats, evaluation=evaluation,
                          sections=data.report_sections(answers), curves=curves)
    summary = {"output_dir": str(out), "model": str(out / "model"), "report": str(report)}
    summary.update({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})
    summary.update(maybe_deploy(cfg, out / "model"))
    return summary
