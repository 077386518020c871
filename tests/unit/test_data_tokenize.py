"""Loss masks: exactly the response tokens are supervised, for the tiny ChatML template and SmolLM2's."""

from __future__ import annotations

import copy
import itertools

import pytest

from rayapp.data.formats import NO_RESPONSE, OVERLONG, ChatExample, RowError, TextExample
from rayapp.data.tokenize import IGNORE_INDEX, TemplateError, encode_example

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42. So the answer is 42."},
    {"role": "user", "content": "And 2 * 3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer: from the converted model if built, else read once from the
    packaged GGUF and kept as a tokenizer directory in the rayapp cache (reading the GGUF takes ~20 s)."""
    import os

    from transformers import AutoTokenizer

    from rayapp.models.io import cache_dir
    from rayapp.models.packaged import gguf_path

    for d in (cache_dir() / "models" / "smollm2-135m-instruct", cache_dir() / "tokenizers" / "smollm2-135m-instruct"):
        if (d / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(d))
    src = gguf_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
    tok.save_pretrained(str(tmp))
    os.replace(tmp, d)
    return tok


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("smollm2_tokenizer")


def supervised_runs(tok, enc) -> list[str]:
    """Decoded text of each contiguous run of supervised tokens."""
    runs = []
    for keep, group in itertools.groupby(zip(enc.input_ids, enc.labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX):
        group = list(group)
        if keep:
            assert all(i == label for i, label in group)
            runs.append(tok.decode([i for i, _ in group]))
    return runs


def chat_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_mask_covers_each_assistant_turn_and_end_token(tokenizer):
    enc = encode_example(tokenizer, ChatExample(CHAT), 512)
    assert enc.input_ids == chat_ids(tokenizer, CHAT)  # same tokens the template gives
    assert supervised_runs(tokenizer, enc) == [CHAT[2]["content"] + "<|im_end|>", CHAT[4]["content"] + "<|im_end|>"]
    assert not enc.truncated and len(enc.labels) == len(enc.input_ids)


def test_text_row_with_template_is_one_user_and_one_assistant_turn(tokenizer):
    enc = encode_example(tokenizer, TextExample("What is 12 + 30?", "42"), 512)
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    assert enc.input_ids == chat_ids(tokenizer, msgs)
    assert supervised_runs(tokenizer, enc) == ["42<|im_end|>"]


def test_text_row_without_template_is_input_output_eos(tiny_tokenizer):
    enc = encode_example(tiny_tokenizer, TextExample("What is 12 + 30? ", "42."), 512, chat_template="never")
    assert enc.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(enc.input_ids) == "What is 12 + 30? 42." + tiny_tokenizer.eos_token
    assert "".join(supervised_runs(tiny_tokenizer, enc)).strip() == "42." + tiny_tokenizer.eos_token
    # 'auto' on a tokenizer without a template does the same
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    assert encode_example(bare, TextExample("What is 12 + 30? ", "42."), 512).input_ids == enc.input_ids
    with pytest.raises(TemplateError, match="data.chat_template: 'always', but .* has no chat template"):
        encode_example(bare, TextExample("q", "a"), 512, chat_template="always")


def test_chat_row_without_template_uses_plain_rendering(tiny_tokenizer):
    enc = encode_example(tiny_tokenizer, ChatExample(CHAT), 512, chat_template="never")
    eos = tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(enc.input_ids) == (
        f"system: Answer briefly.\nuser: What is 12 + 30?\nassistant: {CHAT[2]['content']}{eos}\n"
        f"user: And 2 * 3?\nassistant: 6{eos}\n"
    )
    assert [r.strip() for r in supervised_runs(tiny_tokenizer, enc)] == [CHAT[2]["content"] + eos, "6" + eos]


def test_truncation_flags_and_keeps_a_response_prefix(tiny_tokenizer):
    full = encode_example(tiny_tokenizer, ChatExample(CHAT[:3]), 512)
    first = full.labels.index(next(x for x in full.labels if x != IGNORE_INDEX))
    enc = encode_example(tiny_tokenizer, ChatExample(CHAT[:3]), first + 3)
    assert enc.truncated and len(enc.input_ids) == first + 3
    assert enc.input_ids == full.input_ids[: first + 3] and enc.num_supervised == 3
    assert CHAT[2]["content"].startswith(supervised_runs(tiny_tokenizer, enc)[0])


def test_overlong_bad_row_and_response_truncated_away(tiny_tokenizer):
    n = len(encode_example(tiny_tokenizer, ChatExample(CHAT[:3]), 512).input_ids)
    with pytest.raises(RowError) as e:
        encode_example(tiny_tokenizer, ChatExample(CHAT[:3]), 16, overlong="bad_row")
    assert (e.value.field, e.value.kind) == ("messages", OVERLONG)
    assert e.value.reason == (
        f"{n} tokens, longer than model.max_seq_len=16 (data.overlong: bad_row); "
        "shorten the row, raise model.max_seq_len, or set data.overlong: truncate"
    )
    with pytest.raises(RowError) as e:
        encode_example(tiny_tokenizer, ChatExample(CHAT[:3]), 16)
    assert (e.value.field, e.value.kind) == ("messages", NO_RESPONSE)
    assert e.value.reason.startswith("response truncated away:") and e.value.reason.endswith("raise model.max_seq_len")
    with pytest.raises(RowError) as e:
        encode_example(tiny_tokenizer, TextExample("q " * 40, "a"), 16, chat_template="never")
    assert e.value.field == "output_text" and e.value.kind == NO_RESPONSE


def test_template_that_rewrites_history_is_refused(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # Drops earlier assistant turns, as some reasoning templates drop earlier thoughts.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert supervised_runs(tok, encode_example(tok, ChatExample(CHAT[:3]), 512)) == [CHAT[2]["content"] + "<|im_end|>"]
    with pytest.raises(TemplateError, match="renders turn 2 differently once later turns are added"):
        encode_example(tok, ChatExample(CHAT), 512)


class _NoOffsets:
    """The tiny tokenizer seen as a slow tokenizer (no offsets): exercises the prefix-count fallback."""

    is_fast = False

    def __init__(self, tok):
        self.tok = tok
        self.chat_template, self.eos_token_id = tok.chat_template, tok.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def apply_chat_template(self, *args, **kwargs):
        return self.tok.apply_chat_template(*args, **kwargs)


def test_slow_tokenizer_fallback_gives_the_same_mask(tiny_tokenizer):
    slow = _NoOffsets(tiny_tokenizer)
    for record, template in [(ChatExample(CHAT), "auto"), (TextExample("What is 12 + 30?\n", "42"), "never")]:
        assert encode_example(slow, record, 512, template) == encode_example(tiny_tokenizer, record, 512, template)
