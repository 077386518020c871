"""Property-based tests: generated JSONL files through every reader and row format.

Each file mixes rows that are well formed, rows with fields missing, of the wrong type, empty,
huge or full of odd Unicode (U+0085, U+2028, U+2029, NUL, CR, BOM, unpaired surrogates both
escaped and raw), and lines that are not rows at all (broken JSON, invalid UTF-8, a 5000-digit
number, nesting 100 000 deep). The promise checked for every format: each row is accepted, or
rejected as ``file:line: field: reason`` naming a line that holds it and a field of its format;
no exception other than the project's UserError escapes; the number of rows is the number of
non-blank ``\\n``-separated lines; and whatever is accepted can be written back as UTF-8.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayapp.config.base import DataConfig
from rayapp.data.formats import (
    parse_distill_input,
    parse_preference,
    parse_prompt,
    parse_sft_row,
    parse_teacher_output,
)
from rayapp.data.loaders import DataError, load_records
from rayapp.data.sft import load_sft_dataset
from rayapp.errors import UserError

ODD = ["\x00", "\x85", "\u2028", "\u2029", "\r", "\t", "\ufeff", "\x1c", "\u200b", "e\u0301", "\U0001f600",
       "\ud800", "\udfff"]
ODD_TEXT = st.lists(st.sampled_from(ODD) | st.text(max_size=3), min_size=1, max_size=6).map("".join)
HUGE_TEXT = st.builds(lambda c, n: c * n, st.sampled_from(["x", "\u2028", "é", "\U0001f600"]),
                      st.integers(20_000, 120_000))
GOOD_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).filter(lambda s: s.strip())
TEXT = GOOD_TEXT | GOOD_TEXT | ODD_TEXT | HUGE_TEXT | st.sampled_from(["", "   ", "\u2028\u0085"])
JUNK = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.just([]) | st.just({}) \
    | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
VALUE = TEXT | JUNK


def turns(roles, text_key="content"):
    """A list of turns with the given roles, each holding a text (or, sometimes, junk)."""
    def turn(role, text):
        if text_key == "parts":
            return {"role": role, "parts": [{"text": text}]}
        return {"role": role, "content": text}
    return st.tuples(*[st.builds(turn, st.just(r), TEXT) for r in roles]).map(list)


ROLE = st.sampled_from(["user", "assistant", "system", "model", "tool", "", "USER"]) | JUNK
CHAT_ENDING_ASSISTANT = st.sampled_from([["user", "assistant"], ["system", "user", "assistant"],
                                         ["user", "assistant", "user", "assistant"]]).flatmap(turns)
CHAT_ENDING_USER = st.sampled_from([["user"], ["system", "user"], ["user", "assistant", "user"]]).flatmap(turns)
CONTENTS = st.sampled_from([["user", "model"], ["user"], ["user", "model", "user"]]) \
    .flatmap(functools.partial(turns, text_key="parts"))
BROKEN_CHAT = st.lists(st.fixed_dictionaries({}, optional={"role": ROLE, "content": VALUE, "parts": VALUE}), max_size=4) \
    | JUNK | st.lists(JUNK, max_size=3)
CHAT = CHAT_ENDING_ASSISTANT | CHAT_ENDING_USER | BROKEN_CHAT
SAMPLING = st.dictionaries(st.sampled_from(["temperature", "max_tokens", "n"]), st.integers(0, 5)) | JUNK
TEACHER = st.fixed_dictionaries({}, optional={"model": VALUE, "template": VALUE, "sampling": SAMPLING}) | JUNK
CHOICE = st.sampled_from([0, 1, 2, -1, "0", True, 1.0, None, [0]])

# Per format: the fields a row of it may hold, each with values well formed or not.
FORMATS = {
    "text": {"input_text": VALUE, "output_text": VALUE},
    "chat": {"messages": CHAT},
    "contents": {"contents": CONTENTS | BROKEN_CHAT, "systemInstruction": st.just({"parts": [{"text": "be brief"}]}) | JUNK},
    "preference": {"input_text": VALUE, "messages": CHAT, "candidate_0": VALUE, "candidate_1": VALUE, "choice": CHOICE},
    "preference_pairs": {"prompt": VALUE | CHAT_ENDING_USER, "chosen": VALUE | turns(["assistant"]),
                         "rejected": VALUE | turns(["assistant"])},
    "prompts": {"input_text": VALUE, "messages": CHAT, "contents": CONTENTS, "label": VALUE, "id": JUNK},
    "distill_input": {"input_text": VALUE, "output_text": VALUE, "label": VALUE, "id": JUNK},
    "teacher_output": {"input_text": VALUE, "label": VALUE, "rationale": VALUE, "teacher": TEACHER},
}
PARSERS = {
    "text": functools.partial(parse_sft_row, fmt="text"),
    "chat": functools.partial(parse_sft_row, fmt="chat"),
    "contents": parse_sft_row,
    "preference": parse_preference,
    "preference_pairs": parse_preference,
    "prompts": parse_prompt,
    "distill_input": parse_distill_input,
    "teacher_output": parse_teacher_output,
}

# Fields a parser may name beyond the ones generated for its format (what it expected but found missing).
CHAT_KEYS = ("messages", "contents", "systemInstruction", "input_text")
REPORTED = {
    "text": ("input_text", "output_text"),
    "chat": ("messages",),
    "contents": (*CHAT_KEYS, "output_text"),
    "preference": (*CHAT_KEYS, "candidate_0", "candidate_1", "choice", "prompt", "chosen", "rejected"),
    "preference_pairs": (*CHAT_KEYS, "candidate_0", "candidate_1", "choice", "prompt", "chosen", "rejected"),
    "prompts": CHAT_KEYS,
    "distill_input": ("input_text", "output_text", "label"),
    "teacher_output": ("input_text", "label", "rationale", "teacher"),
}
# Keys an unpaired surrogate may be reported under: the extra keys rows get, and those of BROKEN_LINES.
EXTRA_KEYS = ("meta", "\u2028key", "x" * 40 + "\u2026", "id", "extra")

# Lines that are not rows of any format.
BROKEN_LINES = st.sampled_from([
    b'{"input_text": "a", ',                                    # truncated
    b"{'input_text': 'single quotes'}",
    b'["a", "list"]', b'"a string"', b"42", b"null",
    b'{"input_text": "bad \xff\xfe utf-8", "output_text": "b"}',
    b'{"input_text": "cesu \xed\xa0\x80 surrogate", "output_text": "b"}',
    b'{"input_text": "raw \r carriage return", "output_text": "b"}',
    b'{"input_text": "x", "n": ' + b"9" * 5000 + b"}",
    b'{"input_text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"input_text": "lone \\ud800 escape", "output_text": "b", "candidate_0": "c", "candidate_1": "d", "choice": 0}',
    b'{"input_text": "a", "extra": {"k\\udc00": 1}, "output_text": "b"}',
    b"\xe2\x80\xa8",                                            # a line of U+2028 only
    b"\x85\xc2",                                                # not UTF-8
    b"\x00",
])
BLANK_LINES = st.sampled_from([b"", b"   ", b"\t", b"\r"])


@st.composite
def jsonl_file(draw, fmt: str) -> bytes:
    fields = FORMATS[fmt]
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["row", "row", "row", "broken", "blank"]))
        if kind == "broken":
            lines.append(draw(BROKEN_LINES))
        elif kind == "blank":
            lines.append(draw(BLANK_LINES))
        else:
            row = draw(st.fixed_dictionaries({}, optional=fields))
            if draw(st.booleans()):
                row[draw(st.sampled_from(["meta", "\u2028key", "x" * 500]))] = draw(VALUE)
            # ensure_ascii=False leaves U+0085 / U+2028 raw in the line; surrogatepass writes an
            # unpaired surrogate as the (invalid) UTF-8 bytes of its code point.
            text = json.dumps(row, ensure_ascii=draw(st.booleans()))
            lines.append(text.encode("utf-8", "surrogatepass"))
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")


PROBLEM = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<field>[^:]+): (?P<reason>.+)$", re.S)


def check_outcome(path, raw: bytes, fmt: str, run) -> None:
    """Run a loader on the file under both bad-row policies and check the promises."""
    lines = raw.split(b"\n")
    if lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    nonblank = {i for i, line in enumerate(lines, start=1) if line.strip(b" \t\r\n")}
    allowed_roots = {"row", *FORMATS[fmt], *REPORTED[fmt], *EXTRA_KEYS}
    for policy in ("error", "drop"):
        cfg = DataConfig(train=str(path), on_bad_rows=policy)
        try:
            records, stats = run(path, cfg)
        except DataError as e:
            problems = e.problems
            if not problems:  # "no rows": only possible when the file has none
                assert not nonblank, str(e)
                continue
            assert policy == "error" or len(problems) == len(nonblank), str(e)
            records, reported = [], problems
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the property under test: nothing else escapes
            pytest.fail(f"{fmt}: {type(e).__name__} escaped from the loader: {e!s:.300}")
        else:
            assert stats.rows == len(nonblank), (stats.rows, sorted(nonblank))
            assert stats.examples + stats.dropped == stats.rows
            assert stats.examples == len(records)
            assert policy == "drop" or stats.dropped == 0
            reported = stats.bad_rows
        seen_lines = set()
        for problem in reported:
            assert len(problem) < 400 + len(str(path)), f"error message of {len(problem)} characters"
            m = PROBLEM.match(problem)
            assert m and m.group("file") == str(path), problem
            line = int(m.group("line"))
            assert line in nonblank and line not in seen_lines, (problem, sorted(nonblank))
            seen_lines.add(line)
            root = re.split(r"[.\[]", m.group("field"), maxsplit=1)[0]
            assert root in allowed_roots, problem
            assert m.group("reason").strip(), problem
        for record in records:  # whatever is accepted can be written back as UTF-8
            json.dumps(record, default=lambda o: o.__dict__, ensure_ascii=False).encode("utf-8")


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_row_is_accepted_or_rejected_with_file_line_field_reason(fmt, tmp_path_factory):
    parse = PARSERS[fmt]

    @SETTINGS
    @given(raw=jsonl_file(fmt))
    def run(raw):
        path = tmp_path_factory.mktemp(fmt) / "data.jsonl"
        path.write_bytes(raw)
        check_outcome(path, raw, fmt, lambda p, cfg: load_records(p, parse, cfg))

    run()


@pytest.mark.parametrize("fmt", ["text", "chat", "contents"])
def test_tuning_rows_through_the_tokenizer(fmt, tiny_tokenizer, tmp_path_factory):
    """The same for tuning data read, rendered with the chat template and tokenized."""
    data_format = {"text": "text", "chat": "chat", "contents": "auto"}[fmt]

    @settings(SETTINGS, max_examples=25)
    @given(raw=jsonl_file(fmt))
    def run(raw):
        path = tmp_path_factory.mktemp(fmt) / "train.jsonl"
        path.write_bytes(raw)

        def load(p, cfg):
            ds = load_sft_dataset(p, tiny_tokenizer, cfg.model_copy(update={"format": data_format}), max_seq_len=64)
            return ds.examples, ds.stats

        check_outcome(path, raw, fmt, load)

    run()


def test_line_numbers_count_newlines_only(tmp_path):
    """U+0085, U+2028, U+2029 and a raw CR inside a line do not start a new one (wc -l, sed -n, grep -n)."""
    from rayapp.data.readers import read_rows

    rows = [{"input_text": f"a{c}b", "output_text": "x"} for c in ("\x85", "\u2028", "\u2029")]
    text = "\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + '\n{"input_text": "a\rb"}\n\u2028\n'
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    got = list(read_rows(path))
    assert [r.line for r in got] == [1, 2, 3, 4, 5]
    assert [r.data for r in got[:3]] == rows  # the BOM before line 1 is not part of it
    assert got[3].error.startswith("malformed JSON (Invalid control character at column")
    assert got[4].error.startswith("malformed JSON (Expecting value at column 1")  # not skipped as blank


@pytest.mark.parametrize("raw, field, reason", [
    (b'{"input_text": "a\xffb"}', "row", "not valid UTF-8: byte 0xff at byte 18 of the line"),
    (b'{"input_text": "x", "n": ' + b"1" * 5000 + b"}", "row", "malformed JSON (a number too long to read)"),
    (b'{"input_text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "row", "malformed JSON (nested too deeply to read)"),
    (b'{"input_text": "ok", "messages": [{"role": "user", "content": "a\\udc00"}]}', "messages[0].content",
     "unpaired UTF-16 surrogate \\udc00 in the text at character 2"),
])
def test_unreadable_lines_are_rows_with_an_error(tmp_path, raw, field, reason):
    from rayapp.data.loaders import load_prompts

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"input_text": "fine"}\n' + raw + b"\n")
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"{path}:2: {field}: {reason}")


def test_found_values_are_quoted_short(tmp_path):
    from rayapp.data.loaders import load_preference_pairs

    path = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "r" * 100_000, "content": "c"}]},
            {"input_text": "q", "candidate_0": "a", "candidate_1": "b", "choice": "1" * 100_000},
            {"k" * 1000: 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as e:
        load_preference_pairs(path)
    assert len(e.value.problems) == 3
    assert all(len(p) < 300 + len(str(path)) for p in e.value.problems), e.value.problems
    assert "(100002 characters)" in e.value.problems[0] and "(100002 characters)" in e.value.problems[1]
