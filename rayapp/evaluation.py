"""Answer accuracy of a model directory on held-out rows: generate greedily, extract the answer,
compare it with the gold label using the task's matcher (``rayapp.teachers.templates.answers_match``:
numbers numerically, choices by letter, yes/no normalised, free text ignoring case, punctuation
and articles).

Generic on purpose: ``prompt_fn`` turns a row's ``input_text`` into what the model is asked
(a task prefix for a step-by-step student, a few-shot chain-of-thought prompt for a teacher),
and ``extract`` says whether the whole completion is the answer ("answer"), a rationale
ending in an answer marker ("rationale", parsed with ``parse_rationale``), or either ("auto").

Two backends: "transformers" (batched greedy ``generate`` in this process; no extra processes,
cheap for small models) and "vllm" (a :class:`VLLMEnginePool`, or any ``Generator`` passed in).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rayapp.errors import UserError


class EvaluationError(UserError, ValueError):
    pass


def load_eval_rows(path: str | Path, max_examples: int | None = None, task_type: str = "free") -> list[dict]:
    """Rows {input_text, label} of a held-out file; every row must have output_text or label. A
    worked answer ("... So the answer is 89.") is reduced to its final answer."""
    from rayapp.data.loaders import load_distill_inputs
    from rayapp.teachers.templates import parse_rationale

    records, _ = load_distill_inputs(path)
    rows = []
    for i, r in enumerate(records):
        if r.label is None:
            raise EvaluationError(
                f"{path}: row {i + 1} has no output_text/label; every evaluation row needs the gold answer "
                "(give evaluation.data a labelled file)"
            )
        rows.append({"input_text": r.input_text, "label": parse_rationale(r.label, task_type)[1] or r.label})
    return rows[:max_examples] if max_examples else rows


def render_prompts(tokenizer, prompts: list, chat_template: str = "auto") -> list[str]:
    """The text the model continues. A string becomes the chat template's user turn + generation
    prompt when the tokenizer has one (as ``rayapp.data.tokenize.encode_example`` renders training
    rows), else stays as is; a list of messages is rendered with the template."""
    from rayapp.data.tokenize import use_chat_template

    templated = use_chat_template(tokenizer, chat_template)
    out = []
    for p in prompts:
        if isinstance(p, str) and not templated:
            out.append(p)
            continue
        messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def generate_transformers(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 32,
                          batch_size: int = 32, dtype: str = "float32", add_special_tokens: bool = False) -> list[str]:
    """Greedy completions of already-rendered prompts, batched with left padding."""
    import torch

    from rayapp.models.io import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    tok.padding_side = "left"
    model = load_causal_lm(str(model_dir), dtype).eval()
    stop_ids = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    outs: list[str] = []
    with torch.no_grad():
        for k in range(0, len(prompts), batch_size):
            chunk = prompts[k : k + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids or None,
                                 pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outs += tok.batch_decode(new, skip_special_tokens=True)
    return outs


def generate_vllm(model_dir: str | Path, prompts: list[str], max_new_tokens: int = 32, engine=None, generator=None) -> list[str]:
    """Greedy completions from a vLLM engine pool (started here and shut down unless ``generator`` is given)."""
    from rayapp.config.base import EngineConfig, SamplingConfig

    sampling = SamplingConfig(temperature=0.0, max_tokens=max_new_tokens)
    if generator is not None:
        return [c.text for c in generator.generate(prompts, sampling)]
    from rayapp.teachers.pool import VLLMEnginePool

    with VLLMEnginePool(model_dir, engine or EngineConfig(max_model_len=512), name="evaluation") as pool:
        return [c.text for c in pool.generate(prompts, sampling)]


def score_answers(rows: list[dict], completions: list[str], task_type: str, extract: str = "answer") -> dict:
    """Compare completions with the rows' gold labels. Returns accuracy, correct, n and a few samples."""
    from rayapp.teachers.templates import answers_match, normalize_label, parse_rationale

    if extract not in ("answer", "rationale", "auto"):
        raise ValueError(f"extract must be 'answer', 'rationale' or 'auto', got {extract!r}")
    correct, samples = 0, []
    for row, text in zip(rows, completions, strict=True):
        first_line = text.strip().splitlines()[0] if text.strip() else ""
        if extract == "rationale":
            pred = parse_rationale(text, task_type)[1]
        elif extract == "answer":
            pred = normalize_label(first_line, task_type)
        else:  # auto: an answer marker when there is one, else the first line
            pred = parse_rationale(text, task_type)[1] or normalize_label(first_line, task_type)
        ok = answers_match(pred, row["label"], task_type)
        correct += int(ok)
        if len(samples) < 8:
            samples.append({"input_text": row["input_text"], "gold": row["label"], "completion": text, "pred": pred, "correct": ok})
    n = len(rows)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n, "samples": samples}


def evaluate_answers(model_dir: str | Path, rows: list[dict], *, task_type: str = "free",
                     prompt_fn: Callable[[str], str | list[dict]] = lambda x: x, extract: str = "answer",
                     max_new_tokens: int = 32, backend: str = "transformers", chat_template: str = "auto",
                     engine=None, generator=None) -> dict:
    """Answer accuracy of ``model_dir`` on ``rows`` ({input_text, label}); see the module docstring."""
    from rayapp.data.tokenize import use_chat_template
    from rayapp.models.io import load_tokenizer

    if not rows:
        raise EvaluationError("no evaluation rows: give evaluation.data a labelled file with at least one row")
    tok = load_tokenizer(str(model_dir))
    texts = [prompt_fn(r["input_text"]) for r in rows]
    prompts = render_prompts(tok, texts, chat_template)
    if backend == "transformers":
        plain = not use_chat_template(tok, chat_template)  # plain text rows were tokenized with special tokens
        completions = generate_transformers(model_dir, prompts, max_new_tokens, add_special_tokens=plain)
    elif backend == "vllm":
        completions = generate_vllm(model_dir, prompts, max_new_tokens, engine, generator)
    else:
        raise ValueError(f"unknown evaluation backend {backend!r}; expected 'transformers' or 'vllm'")
    result = score_answers(rows, completions, task_type, extract)
    result.update({"backend": backend, "model": str(model_dir)})
    return result
