"""Few-shot chain-of-thought prompt templates, the rationale/label parser, and answer matching.

Pure Python (no ray, vllm or transformers). A template renders a question as chat messages
(system, few-shot user/assistant turns, the question) for chat models, or as one plain
"Q: ... A: ..." text for base models. Every few-shot answer ends with the same marker
("So the answer is X."), which :func:`parse_rationale` looks for; it also accepts the GSM8K
style "#### X", "Answer: X" and "\\boxed{X}".

Task types: ``free`` (free-form text), ``choice`` (a letter A-E), ``yesno`` and ``number``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from dataclasses import asdict, dataclass, field

from rayapp.data.formats import ANSWER_MARKER

TASK_TYPES = ("free", "choice", "yesno", "number")


@dataclass(frozen=True)
class FewShot:
    question: str
    rationale: str
    answer: str


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    task_type: str
    system: str
    shots: tuple[FewShot, ...] = field(default_factory=tuple)
    answer_prefix: str = ANSWER_MARKER

    def answer_line(self, shot: FewShot) -> str:
        return f"{shot.rationale} {self.answer_prefix} {shot.answer}."

    def messages(self, question: str) -> list[dict]:
        """Chat form: system, one user/assistant pair per shot, then the question."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for shot in self.shots:
            msgs.append({"role": "user", "content": shot.question})
            msgs.append({"role": "assistant", "content": self.answer_line(shot)})
        msgs.append({"role": "user", "content": question.strip()})
        return msgs

    def text(self, question: str) -> str:
        """Plain form for models without a chat template."""
        parts = [self.system] if self.system else []
        parts += [f"Q: {s.question}\nA: {self.answer_line(s)}" for s in self.shots]
        parts.append(f"Q: {question.strip()}\nA:")
        return "\n\n".join(parts)

    def render(self, question: str, chat: bool = True) -> list[dict] | str:
        return self.messages(question) if chat else self.text(question)

    @property
    def fingerprint(self) -> str:
        """Short hash of the whole template, recorded with the teacher output."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def label(self) -> str:
        return f"{self.name}@{self.fingerprint}"


_SYSTEM = "You are a careful tutor. Think step by step, then finish with '{prefix} <answer>.'"

DEFAULT_TEMPLATES: dict[str, PromptTemplate] = {
    "number": PromptTemplate(
        "cot_number",
        "number",
        _SYSTEM.format(prefix=ANSWER_MARKER) + " The answer is a number.",
        (
            FewShot(
                "Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?",
                "3 boxes with 4 apples each is 3 * 4 = 12 apples. After eating 2, 12 - 2 = 10 apples are left.",
                "10",
            ),
            FewShot(
                "A pen costs $2 and a book costs $5. How much do 2 pens and 1 book cost?",
                "2 pens cost 2 * 2 = 4 dollars. Adding the book gives 4 + 5 = 9 dollars.",
                "9",
            ),
        ),
    ),
    "choice": PromptTemplate(
        "cot_choice",
        "choice",
        _SYSTEM.format(prefix=ANSWER_MARKER) + " The answer is one option letter.",
        (
            FewShot(
                "Where would you put a plate after washing it?\nOptions: (A) oven (B) cupboard (C) table (D) floor (E) sink",
                "Clean plates are stored until they are needed, and plates are stored in a cupboard.",
                "(B)",
            ),
            FewShot(
                "What do people use to cut paper?\nOptions: (A) spoon (B) pillow (C) scissors (D) cup (E) rope",
                "Cutting needs a sharp tool; of the options only scissors are made for cutting paper.",
                "(C)",
            ),
        ),
    ),
    "yesno": PromptTemplate(
        "cot_yesno",
        "yesno",
        _SYSTEM.format(prefix=ANSWER_MARKER) + " The answer is yes or no.",
        (
            FewShot("Is 15 an even number?", "Even numbers are divisible by 2. 15 / 2 = 7.5, so 15 is odd.", "no"),
            FewShot("Can a fish live in water?", "Fish breathe through gills that take oxygen from water.", "yes"),
        ),
    ),
    "free": PromptTemplate(
        "cot_free",
        "free",
        _SYSTEM.format(prefix=ANSWER_MARKER) + " Keep the answer short.",
        (
            FewShot("What is the capital of France?", "France is a country in Europe whose capital city is Paris.", "Paris"),
            FewShot("What color do you get by mixing blue and yellow?", "Mixing the primary colors blue and yellow gives green.", "green"),
        ),
    ),
}


def get_template(task_type: str, system: str | None = None, shots: list[dict] | None = None, name: str | None = None) -> PromptTemplate:
    """The default template for ``task_type``, with an optional custom system prompt and shots
    (dicts with question, rationale, answer)."""
    if task_type not in DEFAULT_TEMPLATES:
        raise ValueError(f"unknown task_type '{task_type}' (expected one of: {', '.join(TASK_TYPES)})")
    base = DEFAULT_TEMPLATES[task_type]
    return PromptTemplate(
        name or (base.name if system is None and shots is None else f"{base.name}-custom"),
        task_type,
        base.system if system is None else system,
        base.shots if shots is None else tuple(FewShot(**s) for s in shots),
        base.answer_prefix,
    )


# -- parsing --------------------------------------------------------------------------------

_MARKERS = (
    re.compile(r"####\s*(?P<ans>[^\n]+)"),
    re.compile(r"\\boxed\{(?P<ans>[^{}]+)\}"),
    re.compile(r"(?:so\s+)?the\s+(?:final\s+|correct\s+)?answer\s+is\s*:?\s*(?P<ans>[^\n]+)", re.IGNORECASE),
    re.compile(r"^\s*(?:final\s+)?answer\s*[:\-]\s*(?P<ans>[^\n]+)", re.IGNORECASE | re.MULTILINE),
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_LETTER = re.compile(r"^\W*\(?([A-Ea-e])\b\)?")
_YES = {"yes", "true", "correct", "y"}
_NO = {"no", "false", "incorrect", "n"}


def _clean(ans: str) -> str:
    ans = ans.strip().replace("**", "").replace("$", "").strip()
    # cut at the end of the first sentence: "12. Then ..." -> "12" (a decimal point is kept)
    ans = re.split(r"(?<!\d)\.(?!\d)|\.(?=\s|$)", ans, maxsplit=1)[0]
    return ans.strip().strip(string.whitespace + ".,;:!\"'`").strip()


def normalize_label(answer: str | None, task_type: str) -> str | None:
    """The canonical form of an answer: a number string, a letter, 'yes'/'no', or cleaned text."""
    if answer is None:
        return None
    ans = _clean(str(answer))
    if not ans:
        return None
    if task_type == "number":
        ans = ans.rsplit("=", 1)[-1]  # "7500 - 2499 = 5001" -> the result, not the first operand
        nums = _NUMBER.findall(ans)
        if not nums:
            return None
        value = _to_float(nums[0])
        if value is None:
            return None
        return str(int(value)) if value == int(value) else f"{value:g}"
    if task_type == "choice":
        m = _LETTER.match(ans) or re.search(r"\(([A-Ea-e])\)", ans)
        return m.group(1).upper() if m else None
    if task_type == "yesno":
        word = re.split(r"[\s,.;:!]+", ans.lower(), maxsplit=1)[0]
        return "yes" if word in _YES else "no" if word in _NO else None
    return ans


def _to_float(text: str) -> float | None:
    text = text.replace(",", "")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def parse_rationale(text: str, task_type: str = "free") -> tuple[str, str | None]:
    """Split a teacher completion into (rationale, label). The label is None when no answer
    marker is found or the answer does not fit the task type; the rationale is the text before
    the last marker (or all of it when there is none)."""
    text = (text or "").strip()
    best = None
    for pattern in _MARKERS:
        m = _last_match(pattern, text)
        if m is not None and (best is None or m.start() > best.start()):
            best = m
        if best is not None and pattern.pattern.startswith("####"):
            break  # GSM8K's marker wins when present
    if best is None:
        return text, None
    rationale = text[: best.start()].strip()
    rationale = re.sub(r"[\s,;:]*(So|Therefore|Thus|Hence)?[\s,]*$", "", rationale, flags=re.IGNORECASE).strip()
    return rationale, normalize_label(best.group("ans"), task_type)


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The match starting last (finditer would let an early greedy match swallow later ones)."""
    last, pos = None, 0
    while (m := pattern.search(text, pos)) is not None:
        last, pos = m, m.start() + 1
    return last


def answers_match(pred: str | None, gold: str | None, task_type: str = "free") -> bool:
    """Numbers compare numerically, choices by letter, yes/no normalised, free text case- and
    punctuation-insensitively (articles ignored)."""
    p, g = normalize_label(pred, task_type), normalize_label(gold, task_type)
    if p is None or g is None:
        return False
    if task_type == "number":
        a, b = float(p), float(g)
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    if task_type == "free":
        return _free_key(p) == _free_key(g)
    return p == g


def _free_key(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))
