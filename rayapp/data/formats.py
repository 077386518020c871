"""Parse and validate one data row of every DESIGN.md format into a typed record.

Each ``parse_*`` function takes a row's ``dict`` and returns a record, or raises
:class:`RowError` naming the field (``messages[2].role``) and the reason, which the loaders
turn into ``file:line: field: reason``. Nothing here tokenizes or imports anything heavy.

Formats:

- tuning, text: ``{"input_text", "output_text"}`` -> :class:`TextExample`
- tuning, chat: ``{"messages": [{"role", "content"}]}`` or Gemini-style
  ``{"contents": [{"role": "user|model", "parts": [{"text"}]}], "systemInstruction"?}``
  -> :class:`ChatExample` (``model`` becomes ``assistant``; a turn's part texts are joined)
- preference: ``{input_text|messages, candidate_0, candidate_1, choice}`` or
  ``{prompt, chosen, rejected}`` -> :class:`PreferencePair`
- prompts: ``{input_text}`` or ``{messages}`` -> :class:`PromptRecord` (other keys kept in ``extra``)
- distillation input: ``{input_text, output_text?}`` -> :class:`DistillInput`
- teacher output: ``{input_text, label, rationale, teacher: {model, template, sampling}}``
  -> :class:`TeacherOutput`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
# Ends every worked answer, "<rationale> So the answer is <label>.": few-shot answers, tuning targets,
# step-by-step explain targets; the rationale parser looks for it (rayapp.teachers.templates).
ANSWER_MARKER = "So the answer is"
# Kinds of bad rows, used to count dropped rows by reason in the dataset stats.
MALFORMED, MISSING, WRONG_TYPE, ROLE_ORDER, EMPTY, OVERLONG, NO_RESPONSE = (
    "malformed row",
    "missing field",
    "wrong type",
    "wrong role order",
    "empty text",
    "over-long",
    "response truncated away",
)


class RowError(ValueError):
    """One bad row: ``field`` is the key path inside the row, ``kind`` the category counted in stats."""

    def __init__(self, field: str, reason: str, kind: str = MALFORMED):
        self.field = field
        self.reason = reason
        self.kind = kind
        super().__init__(f"{field}: {reason}")


Message = dict[str, str]  # {"role": ..., "content": ...}: what tokenizer.apply_chat_template takes


@dataclass
class TextExample:
    input_text: str
    output_text: str


@dataclass
class ChatExample:
    messages: list[Message]
    field: str = "messages"  # the row key the conversation came from, for error messages


@dataclass
class PreferencePair:
    prompt_messages: list[Message]  # ends with a user turn
    chosen: str
    rejected: str


@dataclass
class PromptRecord:
    messages: list[Message]  # ends with a user turn
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the row (label, id, ...)


@dataclass
class DistillInput:
    input_text: str
    label: str | None = None  # None: the teacher labels it
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherInfo:
    model: str
    template: str
    sampling: dict[str, Any]


@dataclass
class TeacherOutput:
    input_text: str
    label: str
    rationale: str
    teacher: TeacherInfo
    extra: dict[str, Any] = field(default_factory=dict)


SFTRecord = TextExample | ChatExample


def present(row: dict) -> dict:
    """The row without null values: parquet and `datasets` give every row every column, null where absent."""
    return {k: v for k, v in row.items() if v is not None}


SHOWN_CHARS = 60  # longest found value quoted in an error message


def show_value(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a found value in an error message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _row_keys(row: dict) -> str:
    """The row's keys for an error message: the first ten, each cut short."""
    keys = sorted(map(str, row))
    shown = ", ".join(k if len(k) <= 40 else k[:40] + "..." for k in keys[:10])
    return (shown + (f", ... ({len(keys)} keys)" if len(keys) > 10 else "")) or "none"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require_text(row: dict, key: str, path: str | None = None) -> str:
    """``row[key]`` as a non-empty string, else a RowError naming ``path`` (default ``key``)."""
    path = path or key
    if key not in row:
        raise RowError(path, "missing", MISSING)
    value = row[key]
    if not isinstance(value, str):
        raise RowError(path, f"expected a string, found {_type_name(value)}", WRONG_TYPE)
    if not value.strip():
        raise RowError(path, "empty text", EMPTY)
    return value


def _require_list(row: dict, key: str) -> list:
    if key not in row:
        raise RowError(key, "missing", MISSING)
    value = row[key]
    if not isinstance(value, list):
        raise RowError(key, f"expected a list, found {_type_name(value)}", WRONG_TYPE)
    if not value:
        raise RowError(key, "empty list: expected at least one turn", EMPTY)
    return value


def check_turn_order(messages: list[Message], key: str, ending: str, offset: int = 0, names: dict | None = None) -> None:
    """Optional system first, then user/assistant alternating from user, last turn ``ending``.

    ``offset`` and ``names`` map back to the row's own numbering and role names (Gemini ``contents``
    keep the system instruction outside the list and call the assistant ``model``)."""
    names = names or {}

    def name(role: str) -> str:
        return names.get(role, role)

    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise RowError(key, "only a system turn: expected user/assistant turns after it", ROLE_ORDER)
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            where = "first" if i == start else f"after '{name(messages[i - 1]['role'])}'"
            extra = " (a system turn may only come first)" if role == "system" else ""
            raise RowError(
                f"{key}[{i - offset}].role", f"expected '{name(expected)}' {where}, found '{name(role)}'{extra}", ROLE_ORDER
            )
    if messages[-1]["role"] != ending:
        article = "an" if name("assistant")[0] in "aeiou" else "a"
        what = f"{article} {name('assistant')} turn to learn from" if ending == "assistant" else "a user turn to answer"
        raise RowError(
            f"{key}[{len(messages) - 1 - offset}].role",
            f"the last turn is '{name(messages[-1]['role'])}': expected {what}",
            ROLE_ORDER,
        )


def parse_messages(row: dict, key: str = "messages", ending: str = "assistant") -> list[Message]:
    """Validate ``row[key]`` as a chat; ``ending`` is the role the last turn must have."""
    items = _require_list(row, key)
    messages: list[Message] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RowError(f"{key}[{i}]", f"expected an object with role and content, found {_type_name(item)}", WRONG_TYPE)
        role = item.get("role")
        if role not in ROLES:
            found = "missing" if role is None else show_value(role)
            raise RowError(f"{key}[{i}].role", f"{found}: expected one of {', '.join(ROLES)}", ROLE_ORDER if role else MISSING)
        content = require_text(item, "content", f"{key}[{i}].content")
        messages.append({"role": role, "content": content})
    check_turn_order(messages, key, ending)
    return messages


def _parts_text(item: dict, path: str) -> str:
    parts = item.get("parts")
    if parts is None:
        raise RowError(f"{path}.parts", "missing", MISSING)
    if not isinstance(parts, list) or not parts:
        raise RowError(f"{path}.parts", f"expected a non-empty list of {{text}}, found {_type_name(parts)}", WRONG_TYPE)
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise RowError(f"{path}.parts[{j}]", f"expected an object with text, found {_type_name(part)}", WRONG_TYPE)
        if "text" not in part:
            raise RowError(f"{path}.parts[{j}].text", "missing (only text parts are supported)", MISSING)
        if not isinstance(part["text"], str):
            raise RowError(f"{path}.parts[{j}].text", f"expected a string, found {_type_name(part['text'])}", WRONG_TYPE)
        texts.append(part["text"])
    text = "".join(texts)
    if not text.strip():
        raise RowError(f"{path}.parts", "empty text", EMPTY)
    return text


def parse_contents(row: dict, ending: str = "assistant") -> list[Message]:
    """Gemini-style ``contents`` (+ optional ``systemInstruction``) as messages; ``model`` -> ``assistant``."""
    items = _require_list(row, "contents")
    messages: list[Message] = []
    system = row.get("systemInstruction", row.get("system_instruction"))
    if system is not None:
        if not isinstance(system, dict):
            raise RowError("systemInstruction", f"expected an object with parts, found {_type_name(system)}", WRONG_TYPE)
        messages.append({"role": "system", "content": _parts_text(system, "systemInstruction")})
    for i, item in enumerate(items):
        path = f"contents[{i}]"
        if not isinstance(item, dict):
            raise RowError(path, f"expected an object with role and parts, found {_type_name(item)}", WRONG_TYPE)
        role = item.get("role")
        if role not in ("user", "model"):
            found = "missing" if role is None else show_value(role)
            raise RowError(f"{path}.role", f"{found}: expected user or model", ROLE_ORDER if role else MISSING)
        messages.append({"role": "assistant" if role == "model" else "user", "content": _parts_text(item, path)})
    offset = 1 if system is not None else 0
    check_turn_order(messages, "contents", ending, offset, {"assistant": "model"})
    return messages


def detect_sft_format(row: dict, fmt: str = "auto") -> str:
    """'text' or 'chat' for this row, given ``data.format`` (auto | text | chat)."""
    if fmt in ("text", "chat"):
        return fmt
    if "messages" in row or "contents" in row:
        return "chat"
    if "input_text" in row or "output_text" in row:
        return "text"
    raise RowError(
        "input_text",
        f"missing: expected {{input_text, output_text}}, {{messages: [...]}} or {{contents: [...]}} (row keys: {_row_keys(row)})",
        MISSING,
    )


def parse_sft_row(row: dict, fmt: str = "auto") -> SFTRecord:
    """One tuning row (text or chat) as a TextExample or ChatExample."""
    row = present(row)
    kind = detect_sft_format(row, fmt)
    if kind == "text":
        return TextExample(require_text(row, "input_text"), require_text(row, "output_text"))
    if "messages" in row or "contents" not in row:
        return ChatExample(parse_messages(row, "messages"), "messages")
    return ChatExample(parse_contents(row), "contents")


def parse_prompt_messages(row: dict) -> tuple[list[Message], set[str]]:
    """The prompt of a row: ``messages`` ending with a user turn, or ``input_text`` as one user turn.

    Returns the messages and the keys they used."""
    if "messages" in row:
        return parse_messages(row, "messages", ending="user"), {"messages"}
    if "contents" in row:
        return parse_contents(row, ending="user"), {"contents", "systemInstruction", "system_instruction"}
    if "input_text" in row:
        return [{"role": "user", "content": require_text(row, "input_text")}], {"input_text"}
    raise RowError("input_text", f"missing: expected input_text or messages (row keys: {_row_keys(row)})", MISSING)


def parse_prompt(row: dict) -> PromptRecord:
    """A prompt for RL rollouts or batch generation; every other key (label, id, ...) is kept in extra."""
    row = present(row)
    messages, used = parse_prompt_messages(row)
    return PromptRecord(messages, {k: v for k, v in row.items() if k not in used})


def _response_text(row: dict, key: str) -> str:
    """A preference response: a string, or a list holding one assistant message (TRL's conversational form)."""
    value = row.get(key)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise RowError(key, "expected a string or a list of one assistant message", WRONG_TYPE)
        return require_text(value[0], "content", f"{key}[0].content")
    return require_text(row, key)


def parse_preference(row: dict) -> PreferencePair:
    """``{input_text|messages, candidate_0, candidate_1, choice}`` or ``{prompt, chosen, rejected}``."""
    row = present(row)
    if "chosen" in row or "rejected" in row or "prompt" in row:
        prompt = row.get("prompt")
        if prompt is None and "prompt" not in row and ("messages" in row or "input_text" in row):
            messages, _ = parse_prompt_messages(row)
        elif isinstance(prompt, list):
            messages = parse_messages(row, "prompt", ending="user")
        else:
            messages = [{"role": "user", "content": require_text(row, "prompt")}]
        chosen, rejected = _response_text(row, "chosen"), _response_text(row, "rejected")
    else:
        messages, _ = parse_prompt_messages(row)
        candidates = [_response_text(row, "candidate_0"), _response_text(row, "candidate_1")]
        if "choice" not in row:
            raise RowError("choice", "missing: expected 0 or 1 (the preferred candidate)", MISSING)
        choice = row["choice"]
        if isinstance(choice, bool) or choice not in (0, 1):
            raise RowError("choice", f"expected 0 or 1, found {show_value(choice)}", WRONG_TYPE)
        chosen, rejected = candidates[int(choice)], candidates[1 - int(choice)]
    if chosen == rejected:
        raise RowError("rejected", "identical to the chosen response: the pair teaches nothing", EMPTY)
    return PreferencePair(messages, chosen, rejected)


def parse_distill_input(row: dict) -> DistillInput:
    """``{input_text, output_text?}``: ``output_text`` (or ``label``) is the gold label, if any."""
    row = present(row)
    text = require_text(row, "input_text")
    label = None
    for key in ("output_text", "label"):
        if key in row:
            label = require_text(row, key)
            break
    return DistillInput(text, label, {k: v for k, v in row.items() if k not in ("input_text", "output_text", "label")})


def parse_teacher_output(row: dict) -> TeacherOutput:
    """A teacher-labelled row written by the batch job: label, rationale and the teacher that made them."""
    row = present(row)
    text, label, rationale = (require_text(row, k) for k in ("input_text", "label", "rationale"))
    teacher = row.get("teacher")
    if teacher is None:
        raise RowError("teacher", "missing: expected {model, template, sampling}", MISSING)
    if not isinstance(teacher, dict):
        raise RowError("teacher", f"expected an object {{model, template, sampling}}, found {_type_name(teacher)}", WRONG_TYPE)
    model = require_text(teacher, "model", "teacher.model")
    template = require_text(teacher, "template", "teacher.template")
    sampling = teacher.get("sampling")
    if not isinstance(sampling, dict):
        found = "missing" if sampling is None else f"expected an object, found {_type_name(sampling)}"
        raise RowError("teacher.sampling", found, MISSING if sampling is None else WRONG_TYPE)
    extra = {k: v for k, v in row.items() if k not in ("input_text", "label", "rationale", "teacher")}
    return TeacherOutput(text, label, rationale, TeacherInfo(model, template, dict(sampling)), extra)
