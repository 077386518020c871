"""Loaders: the bad-row policy (error lists file:line: field: reason; drop counts), stats, splits."""

from __future__ import annotations

import json

import pytest

from rayapp.config.base import DataConfig
from rayapp.data.formats import ChatExample, PreferencePair, TextExample
from rayapp.data.loaders import (
    DataError,
    load_distill_inputs,
    load_preference_pairs,
    load_prompts,
    load_teacher_outputs,
    split_indices,
)
from rayapp.data.sft import load_sft_dataset, load_sft_splits, split_validation
from rayapp.data.stats import DatasetStats
from rayapp.data.tokenize import Encoded, encode_example

GOOD = [
    {"input_text": "What is 2 + 2?", "output_text": "4"},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello to you"}]},
    {"contents": [{"role": "user", "parts": [{"text": "say "}, {"text": "yes"}]}, {"role": "model", "parts": [{"text": "yes"}]}]},
]


def write_lines(path, items) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return str(path)


@pytest.fixture
def mixed_file(tmp_path):
    return write_lines(
        tmp_path / "train.jsonl",
        [
            GOOD[0],
            "{oops",
            GOOD[1],
            {"input_text": "q"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            {"input_text": "", "output_text": "x"},
            GOOD[2],
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
    )


EXPECTED = [
    "{f}:2: row: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
    "{f}:4: output_text: missing",
    "{f}:5: messages[1].role: expected 'assistant' after 'user', found 'user'",
    "{f}:6: input_text: empty text",
]


def test_error_mode_lists_every_bad_row(mixed_file, tiny_tokenizer):
    with pytest.raises(DataError) as e:
        load_sft_dataset(mixed_file, tiny_tokenizer, DataConfig(), 128)
    assert e.value.problems == [x.format(f=mixed_file) for x in EXPECTED]
    text = str(e.value)
    assert text.startswith(f"{mixed_file}: 4 bad rows (data.on_bad_rows: error), stopping before training:\n")
    assert "set data.on_bad_rows: drop" in text


def test_drop_mode_counts_by_reason_and_encodes_the_rest(mixed_file, tiny_tokenizer):
    ds = load_sft_dataset(mixed_file, tiny_tokenizer, DataConfig(on_bad_rows="drop"), 128)
    records = [TextExample("What is 2 + 2?", "4"), ChatExample(GOOD[1]["messages"])]
    records += [ChatExample([{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}], "contents")]
    records += [ChatExample([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])]
    expected = [encode_example(tiny_tokenizer, r, 128) for r in records]
    assert ds.examples == expected
    s = ds.stats
    assert (s.rows, s.examples, s.dropped, s.truncated) == (8, 4, 4, 0)
    assert dict(s.drop_reasons) == {"malformed row": 1, "missing field": 1, "wrong role order": 1, "empty text": 1}
    assert s.bad_rows == [x.format(f=mixed_file) for x in EXPECTED]
    assert s.total_tokens == sum(len(e.input_ids) for e in expected)
    assert s.supervised_tokens == sum(e.num_supervised for e in expected)
    lengths = sorted(len(e.input_ids) for e in expected)
    d = s.to_dict()
    assert d["token_lengths"] == {"min": lengths[0], "median": (lengths[1] + lengths[2]) / 2, "p95": lengths[3], "max": lengths[3]}
    assert d["dropped"] == 4 and d["drop_reasons"]["missing field"] == 1


def test_overlong_policies(tmp_path, tiny_tokenizer):
    long = {"input_text": "What is 2 + 2? " * 20, "output_text": "4"}
    f = write_lines(tmp_path / "t.jsonl", [GOOD[0], long, {"input_text": "hi", "output_text": "hello " * 40}])
    with pytest.raises(DataError) as e:
        load_sft_dataset(f, tiny_tokenizer, DataConfig(overlong="bad_row"), 40)
    assert [p.split(": ", 2)[:2] for p in e.value.problems] == [[f"{f}:2", "input_text"], [f"{f}:3", "input_text"]]
    assert "longer than model.max_seq_len=40 (data.overlong: bad_row)" in e.value.problems[0]
    with pytest.raises(DataError) as e:  # truncating row 2 leaves no response; row 3 keeps part of it
        load_sft_dataset(f, tiny_tokenizer, DataConfig(), 40)
    assert e.value.problems == [
        f"{f}:2: output_text: response truncated away: the prompt alone fills model.max_seq_len=40; raise model.max_seq_len"
    ]
    ds = load_sft_dataset(f, tiny_tokenizer, DataConfig(on_bad_rows="drop"), 40)
    assert ds.stats.examples == 2 and ds.stats.truncated == 1 and dict(ds.stats.drop_reasons) == {"response truncated away": 1}
    assert ds.examples[1].truncated and len(ds.examples[1].input_ids) == 40


def test_many_bad_rows_are_summarised_and_all_bad_is_an_error(tmp_path, tiny_tokenizer):
    f = write_lines(tmp_path / "bad.jsonl", [{"input_text": "q"}] * 25)
    with pytest.raises(DataError) as e:
        load_sft_dataset(f, tiny_tokenizer, DataConfig(), 64)
    assert len(e.value.problems) == 25 and str(e.value).count("output_text: missing") == 20
    assert "\n  ... and 5 more\n" in str(e.value)
    with pytest.raises(DataError, match=r"no usable tuning examples: all 25 rows are bad \(first: .*bad.jsonl:1: output_text: missing\)"):
        load_sft_dataset(f, tiny_tokenizer, DataConfig(on_bad_rows="drop"), 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable tuning examples: it holds no rows"):
        load_sft_dataset(empty, tiny_tokenizer, DataConfig(), 64)


def test_max_rows_and_forced_format(tmp_path, tiny_tokenizer):
    f = write_lines(tmp_path / "t.jsonl", GOOD)
    assert len(load_sft_dataset(f, tiny_tokenizer, DataConfig(max_rows=2), 64)) == 2
    with pytest.raises(DataError) as e:
        load_sft_dataset(f, tiny_tokenizer, DataConfig(format="text"), 64)
    assert e.value.problems == [f"{f}:2: input_text: missing", f"{f}:3: input_text: missing"]


def test_validation_split_is_seeded_and_disjoint(tmp_path, tiny_tokenizer):
    assert split_indices(10, 0.2, seed=1) == split_indices(10, 0.2, seed=1)
    train, val = split_indices(10, 0.2, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(10))
    assert split_indices(10, 0.0) == (list(range(10)), [])
    assert split_indices(3, 0.01)[1] and split_indices(1, 0.4) == ([0], [])
    rows = [{"input_text": f"What is {i} + 1?", "output_text": str(i + 1)} for i in range(10)]
    f = write_lines(tmp_path / "t.jsonl", rows)
    full = load_sft_dataset(f, tiny_tokenizer, DataConfig(), 64)
    tr, va = split_validation(full, 0.2, seed=1)
    assert tr.examples == [full.examples[i] for i in train] and va.examples == [full.examples[i] for i in val]
    assert tr.stats.examples == 8 and tr.stats.rows == 10 and va.stats.examples == 2
    assert tr.stats.total_tokens + va.stats.total_tokens == full.stats.total_tokens
    cfg = DataConfig(train=f, validation_split=0.2)
    tr2, va2 = load_sft_splits(cfg, tiny_tokenizer, 64, seed=1)
    assert tr2.examples == tr.examples and va2.examples == va.examples
    g = write_lines(tmp_path / "v.jsonl", rows[:3])
    assert len(load_sft_splits(DataConfig(train=f, validation=g), tiny_tokenizer, 64)[1]) == 3
    assert load_sft_splits(DataConfig(train=f), tiny_tokenizer, 64)[1] is None


def test_stats_numbers_and_table():
    s = DatasetStats(source="data/train.jsonl", rows=6)
    for n, sup, cut in [(3, 1, False), (5, 2, False), (10, 4, True), (4, 1, False)]:
        s.add_example(Encoded(list(range(n)), [-100] * (n - sup) + [1] * sup, cut))
    s.add_bad_row("missing field", "data/train.jsonl:2: output_text: missing")
    s.add_bad_row("missing field", "data/train.jsonl:5: output_text: missing")
    assert s.to_dict() == {
        "source": "data/train.jsonl",
        "rows": 6,
        "examples": 4,
        "dropped": 2,
        "drop_reasons": {"missing field": 2},
        "truncated": 1,
        "total_tokens": 22,
        "supervised_tokens": 8,
        "token_lengths": {"min": 3, "median": 4.5, "p95": 10, "max": 10},
    }
    assert s.format() == (
        "data/train.jsonl\n"
        "  rows read                  6\n"
        "  examples                   4\n"
        "  dropped                    2  (missing field: 2)\n"
        "  truncated                  1\n"
        "  tokens                     22\n"
        "  supervised tokens          8  (36.4%)\n"
        "  tokens min/median/p95/max  3 / 4.5 / 10 / 10"
    )
    assert DatasetStats(rows=1, examples=1).to_dict()["token_lengths"] is None


def test_stats_line_shows_token_counts_only_when_tokenized():
    read_only = DatasetStats(source="in.jsonl", rows=3, examples=2)
    read_only.add_bad_row("empty_input", "in.jsonl:2: input_text: empty")
    assert DatasetStats.format_line(read_only.to_dict()) == "source in.jsonl, rows 3, examples 2, dropped 1"
    encoded = DatasetStats(rows=1)
    encoded.add_example(Encoded(input_ids=[1, 2, 3], labels=[-100, 2, 3], truncated=False))
    assert DatasetStats.format_line(encoded.to_dict()) == (
        "source , rows 1, examples 1, dropped 0, truncated 0, total_tokens 3, supervised_tokens 2")


def test_preference_prompt_and_distill_loaders(tmp_path):
    f = write_lines(
        tmp_path / "pref.jsonl",
        [
            {"input_text": "q", "candidate_0": "bad", "candidate_1": "good", "choice": 1},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "chosen": "good"},
        ],
    )
    with pytest.raises(DataError) as e:
        load_preference_pairs(f)
    assert e.value.problems == [f"{f}:3: rejected: missing"]
    pairs, stats = load_preference_pairs(f, DataConfig(on_bad_rows="drop"))
    assert pairs == [PreferencePair([{"role": "user", "content": "q"}], "good", "bad")] * 2
    assert (stats.examples, stats.dropped, stats.to_dict()["token_lengths"]) == (2, 1, None)

    f = write_lines(tmp_path / "prompts.jsonl", [{"input_text": "2+2?", "label": "4"}, {"output_text": "x"}])
    prompts, stats = load_prompts(f, DataConfig(on_bad_rows="drop"))
    assert prompts[0].extra == {"label": "4"} and stats.bad_rows == [
        f"{f}:2: input_text: missing: expected input_text or messages (row keys: output_text)"
    ]

    f = write_lines(tmp_path / "distill.jsonl", [{"input_text": "a"}, {"input_text": "b", "output_text": "c"}, {"input_text": 3}])
    with pytest.raises(DataError, match=r"distill.jsonl:3: input_text: expected a string, found int"):
        load_distill_inputs(f)
    inputs, _ = load_distill_inputs(f, DataConfig(on_bad_rows="drop"))
    assert [(x.input_text, x.label) for x in inputs] == [("a", None), ("b", "c")]

    teacher = {"model": "m", "template": "t", "sampling": {"temperature": 0.0}}
    f = write_lines(tmp_path / "teacher.jsonl", [{"input_text": "a", "label": "b", "rationale": "r", "teacher": teacher}])
    outputs, stats = load_teacher_outputs(f)
    assert outputs[0].teacher.sampling == {"temperature": 0.0} and stats.examples == 1


def test_parquet_and_datasets_dir_with_mixed_formats(tmp_path, tiny_tokenizer):
    """Columnar files give every row every column (null where absent): nulls count as absent keys."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD[0], GOOD[1], {"input_text": "q", "output_text": None}]
    expected = [
        encode_example(tiny_tokenizer, TextExample("What is 2 + 2?", "4"), 64),
        encode_example(tiny_tokenizer, ChatExample(GOOD[1]["messages"]), 64),
    ]
    columns = {k: [r.get(k) for r in rows] for k in ("input_text", "output_text", "messages")}
    pq.write_table(pa.Table.from_pydict(columns), tmp_path / "t.parquet")
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "t.parquet", tmp_path / "ds"):
        with pytest.raises(DataError) as e:
            load_sft_dataset(path, tiny_tokenizer, DataConfig(), 64)
        assert e.value.problems == [f"{path}:3: output_text: missing"]
        ds = load_sft_dataset(path, tiny_tokenizer, DataConfig(on_bad_rows="drop"), 64)
        assert ds.examples == expected and ds.stats.dropped == 1


def test_encoded_pairs_count_both_sequences_in_the_stats(tmp_path, tiny_tokenizer):
    from rayapp.data.formats import parse_preference
    from rayapp.data.loaders import load_records

    f = write_lines(tmp_path / "pref.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5 or so"}])

    def parse(row):
        pair = parse_preference(row)
        enc = [ChatExample(pair.prompt_messages + [{"role": "assistant", "content": r}]) for r in (pair.chosen, pair.rejected)]
        return {"chosen": encode_example(tiny_tokenizer, enc[0], 64), "rejected": encode_example(tiny_tokenizer, enc[1], 64)}

    items, stats = load_records(f, parse)
    chosen, rejected = items[0]["chosen"], items[0]["rejected"]
    assert stats.examples == 1 and sorted(stats.lengths) == sorted([len(chosen), len(rejected)])
    assert stats.supervised_tokens == chosen.num_supervised + rejected.num_supervised
