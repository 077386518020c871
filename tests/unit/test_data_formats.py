"""Row formats: every DESIGN.md format parses to its record, and each bad row names field and reason."""

from __future__ import annotations

import pytest

from rayapp.data.formats import (
    EMPTY,
    MISSING,
    ROLE_ORDER,
    WRONG_TYPE,
    ChatExample,
    DistillInput,
    PreferencePair,
    PromptRecord,
    RowError,
    TeacherInfo,
    TeacherOutput,
    TextExample,
    detect_sft_format,
    parse_distill_input,
    parse_preference,
    parse_prompt,
    parse_sft_row,
    parse_teacher_output,
)

U, A, S = "user", "assistant", "system"


def m(role, content):
    return {"role": role, "content": content}


def err(fn, row):
    with pytest.raises(RowError) as e:
        fn(row)
    return f"{e.value.field}: {e.value.reason}", e.value.kind


def test_text_and_chat_rows():
    assert parse_sft_row({"input_text": "q", "output_text": "a", "id": 3}) == TextExample("q", "a")
    msgs = [m(S, "be brief"), m(U, "hi"), m(A, "hello"), m(U, "2+2?"), m(A, "4")]
    assert parse_sft_row({"messages": msgs}) == ChatExample(msgs, "messages")


def test_contents_parts_become_messages():
    row = {
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "What is "}, {"text": "2+2?"}]},
            {"role": "model", "parts": [{"text": "4"}]},
        ],
    }
    assert parse_sft_row(row) == ChatExample([m(S, "be brief"), m(U, "What is 2+2?"), m(A, "4")], "contents")


def test_format_detection_and_forcing():
    assert detect_sft_format({"messages": []}) == "chat"
    assert detect_sft_format({"contents": []}) == "chat"
    assert detect_sft_format({"input_text": "x"}) == "text"
    assert detect_sft_format({"messages": []}, "text") == "text"
    assert err(detect_sft_format, {"prompt": "x"}) == (
        "input_text: missing: expected {input_text, output_text}, {messages: [...]} or {contents: [...]} (row keys: prompt)",
        MISSING,
    )
    # data.format: text on a chat row asks for the text fields
    assert err(lambda r: parse_sft_row(r, "text"), {"messages": [m(U, "a"), m(A, "b")]}) == ("input_text: missing", MISSING)
    assert err(lambda r: parse_sft_row(r, "chat"), {"input_text": "a", "output_text": "b"}) == ("messages: missing", MISSING)


@pytest.mark.parametrize(
    "row, message, kind",
    [
        ({"input_text": "q"}, "output_text: missing", MISSING),
        ({"input_text": "  ", "output_text": "a"}, "input_text: empty text", EMPTY),
        ({"input_text": "q", "output_text": 4}, "output_text: expected a string, found int", WRONG_TYPE),
        ({"messages": []}, "messages: empty list: expected at least one turn", EMPTY),
        ({"messages": "hi"}, "messages: expected a list, found str", WRONG_TYPE),
        ({"messages": [m(U, "a"), "b"]}, "messages[1]: expected an object with role and content, found str", WRONG_TYPE),
        ({"messages": [m(U, "a"), m("bot", "b")]}, "messages[1].role: 'bot': expected one of system, user, assistant", ROLE_ORDER),
        ({"messages": [m(U, "a"), {"content": "b"}]}, "messages[1].role: missing: expected one of system, user, assistant", MISSING),
        ({"messages": [m(U, "a"), m(A, "")]}, "messages[1].content: empty text", EMPTY),
        ({"messages": [m(U, "a"), {"role": A}]}, "messages[1].content: missing", MISSING),
        ({"messages": [m(A, "a"), m(U, "b")]}, "messages[0].role: expected 'user' first, found 'assistant'", ROLE_ORDER),
        ({"messages": [m(U, "a"), m(U, "b")]}, "messages[1].role: expected 'assistant' after 'user', found 'user'", ROLE_ORDER),
        (
            {"messages": [m(U, "a"), m(S, "b"), m(A, "c")]},
            "messages[1].role: expected 'assistant' after 'user', found 'system' (a system turn may only come first)",
            ROLE_ORDER,
        ),
        ({"messages": [m(S, "a")]}, "messages: only a system turn: expected user/assistant turns after it", ROLE_ORDER),
        ({"messages": [m(U, "a"), m(A, "b"), m(U, "c")]}, "messages[2].role: the last turn is 'user': expected an assistant turn to learn from", ROLE_ORDER),
        ({"contents": [{"role": "user", "parts": [{"text": "a"}]}, {"role": "assistant", "parts": [{"text": "b"}]}]}, "contents[1].role: 'assistant': expected user or model", ROLE_ORDER),
        ({"contents": [{"role": "user", "parts": []}]}, "contents[0].parts: expected a non-empty list of {text}, found list", WRONG_TYPE),
        ({"contents": [{"role": "user", "parts": [{"inline_data": {}}]}]}, "contents[0].parts[0].text: missing (only text parts are supported)", MISSING),
        ({"contents": [{"role": "user", "parts": [{"text": " "}]}]}, "contents[0].parts: empty text", EMPTY),
        (
            {"systemInstruction": {"parts": [{"text": "s"}]}, "contents": [{"role": "model", "parts": [{"text": "b"}]}]},
            "contents[0].role: expected 'user' first, found 'model'",
            ROLE_ORDER,
        ),
        ({"contents": [{"role": "user", "parts": [{"text": "a"}]}]}, "contents[0].role: the last turn is 'user': expected a model turn to learn from", ROLE_ORDER),
    ],
)
def test_bad_tuning_rows(row, message, kind):
    assert err(parse_sft_row, row) == (message, kind)


def test_preference_both_forms():
    pair = PreferencePair([m(U, "q")], "good", "bad")
    assert parse_preference({"input_text": "q", "candidate_0": "bad", "candidate_1": "good", "choice": 1}) == pair
    assert parse_preference({"input_text": "q", "candidate_0": "good", "candidate_1": "bad", "choice": 0}) == pair
    assert parse_preference({"prompt": "q", "chosen": "good", "rejected": "bad"}) == pair
    chat = [m(S, "s"), m(U, "q")]
    assert parse_preference({"messages": chat, "candidate_0": "good", "candidate_1": "bad", "choice": 0}).prompt_messages == chat
    conversational = {"prompt": chat, "chosen": [m(A, "good")], "rejected": [m(A, "bad")]}
    assert parse_preference(conversational) == PreferencePair(chat, "good", "bad")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input_text": "q", "candidate_0": "a", "candidate_1": "b"}, "choice: missing: expected 0 or 1 (the preferred candidate)"),
        ({"input_text": "q", "candidate_0": "a", "candidate_1": "b", "choice": 2}, "choice: expected 0 or 1, found 2"),
        ({"input_text": "q", "candidate_0": "a", "candidate_1": "b", "choice": True}, "choice: expected 0 or 1, found True"),
        ({"input_text": "q", "candidate_0": "a", "choice": 0}, "candidate_1: missing"),
        ({"prompt": "q", "chosen": "a"}, "rejected: missing"),
        ({"chosen": "a", "rejected": "b"}, "prompt: missing"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected: identical to the chosen response: the pair teaches nothing"),
        ({"prompt": [m(U, "q"), m(A, "a")], "chosen": "a", "rejected": "b"}, "prompt[1].role: the last turn is 'assistant': expected a user turn to answer"),
        ({"prompt": "q", "chosen": [m(U, "a")], "rejected": "b"}, "chosen: expected a string or a list of one assistant message"),
    ],
)
def test_bad_preference_rows(row, message):
    assert err(parse_preference, row)[0] == message


def test_prompts_keep_extra_fields():
    assert parse_prompt({"input_text": "2+2?", "label": "4", "id": 7}) == PromptRecord([m(U, "2+2?")], {"label": "4", "id": 7})
    chat = [m(S, "s"), m(U, "q")]
    assert parse_prompt({"messages": chat, "output_text": "a"}) == PromptRecord(chat, {"output_text": "a"})
    assert err(parse_prompt, {"messages": [m(U, "q"), m(A, "a")]})[0] == (
        "messages[1].role: the last turn is 'assistant': expected a user turn to answer"
    )
    assert err(parse_prompt, {"text": "q"})[0] == "input_text: missing: expected input_text or messages (row keys: text)"


def test_distillation_input_and_teacher_output():
    assert parse_distill_input({"input_text": "q"}) == DistillInput("q", None, {})
    assert parse_distill_input({"input_text": "q", "output_text": "a", "id": 1}) == DistillInput("q", "a", {"id": 1})
    assert parse_distill_input({"input_text": "q", "output_text": None}).label is None
    assert err(parse_distill_input, {"input_text": "q", "output_text": ""})[0] == "output_text: empty text"
    teacher = {"model": "smollm2", "template": "cot-v1", "sampling": {"temperature": 0.7}}
    row = {"input_text": "q", "label": "4", "rationale": "2+2 is 4", "teacher": teacher, "id": 5}
    assert parse_teacher_output(row) == TeacherOutput("q", "4", "2+2 is 4", TeacherInfo("smollm2", "cot-v1", {"temperature": 0.7}), {"id": 5})
    assert err(parse_teacher_output, {**row, "rationale": ""})[0] == "rationale: empty text"
    assert err(parse_teacher_output, {**row, "teacher": None})[0] == "teacher: missing: expected {model, template, sampling}"
    assert err(parse_teacher_output, {**row, "teacher": {**teacher, "model": 3}})[0] == "teacher.model: expected a string, found int"
    assert err(parse_teacher_output, {**row, "teacher": {"model": "x", "template": "t"}})[0] == "teacher.sampling: missing"
