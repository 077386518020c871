"""Distilling step-by-step (Hsieh et al., 2023, "Distilling Step-by-Step! Outperforming Larger
Language Models with Less Training Data and Smaller Model Sizes").

The student is trained on two tasks built from one teacher-annotated example (x, y, r):

    "predict: " + x  ->  y        (label task)
    "explain: " + x  ->  r        (rationale task)

and at inference only the label task is asked, so rationales cost nothing at serving time.

Departure (an option, on by default in the config): the rationale target may end with the label,
"explain: " + x -> r + " So the answer is " + y + "." (the teacher's whole chain of thought, as
in Li et al. 2022's multi-task CoT), where the reference code's target is r alone. On the
chain_sum benchmark (bench/distill_quality.py) the label task's held-out accuracy is higher with
it, and the rationale asked for at inference then ends in an answer that can be checked.

The paper writes L = L_label + lambda * L_rationale. We use alpha * L_label + (1 - alpha) *
L_rationale as the reference code does (google-research/distilling-step-by-step,
``TaskPrefixTrainer.compute_loss``); with rationale_weight := 1 - alpha, rationale_weight = 0
(alpha = 1) is standard fine-tuning on labels alone. The reference runs a seq2seq model (T5);
for a causal LM the prefix + input is the prompt and only the target tokens carry the loss.
"""

from __future__ import annotations

import torch

from rayapp.algorithms import IGNORE_INDEX
from rayapp.algorithms.sft import token_nll_sum

LABEL_TASK = "predict"
RATIONALE_TASK = "explain"


def two_task_examples(input_text: str, label: str, rationale: str | None,
                      predict_prefix: str = "predict: ",
                      explain_prefix: str = "explain: ",
                      answer_marker: str | None = None) -> list[tuple[str, str, str]]:
    """[(task, prompt, target)]: the label example, then the rationale example when there is a
    non-empty rationale (a row without one still trains the label task). With ``answer_marker``
    the rationale target ends with "<marker> <label>." (see the module docstring).

    >>> two_task_examples("2+2?", "4", "2 plus 2 is 4")
    [('predict', 'predict: 2+2?', '4'), ('explain', 'explain: 2+2?', '2 plus 2 is 4')]
    >>> two_task_examples("2+2?", "4", "2 plus 2 is 4.", answer_marker="So the answer is")[1]
    ('explain', 'explain: 2+2?', '2 plus 2 is 4. So the answer is 4.')
    """
    out = [(LABEL_TASK, predict_prefix + input_text, label)]
    if rationale is not None and rationale.strip():
        target = rationale.strip()
        if answer_marker:
            target = f"{target} {answer_marker} {label}."
        out.append((RATIONALE_TASK, explain_prefix + input_text, target))
    return out


def two_task_loss(label_loss: torch.Tensor, rationale_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * L_label + (1 - alpha) * L_rationale, alpha in [0, 1] (reference-code convention;
    the paper's lambda corresponds to (1 - alpha) / alpha up to the overall scale)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:  # standard fine-tuning: do not let a NaN/inf rationale loss leak in via 0 * inf
        return label_loss
    return alpha * label_loss + (1.0 - alpha) * rationale_loss


def split_task_nll_sums(logits: torch.Tensor, labels: torch.Tensor, is_rationale: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token NLL sums per task for a micro-batch that mixes both tasks.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX, is_rationale (B,) bool, or (B, T) per token
    when a row packs examples of both tasks (the task of the example each label belongs to).
    Returns (label_sum, label_n, rationale_sum, rationale_n); divide each sum by its task's
    global token count, then combine with ``two_task_loss`` (each task is a mean over its own
    tokens, as in the reference where each task is a separate forward pass).
    """
    is_rationale = is_rationale.bool()                               # (B,) or (B, T)
    lab = labels.clone()
    lab[is_rationale] = IGNORE_INDEX
    rat = labels.clone()
    rat[~is_rationale] = IGNORE_INDEX
    label_sum, label_n = token_nll_sum(logits, lab)
    rationale_sum, rationale_n = token_nll_sum(logits, rat)
    return label_sum, label_n, rationale_sum, rationale_n
