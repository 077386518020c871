"""Turn a tuning record into token ids and a loss mask, for any chat template.

The loss is on the response only: every assistant turn of a chat, including the template's
end-of-turn token (``<|im_end|>`` for ChatML), or ``output_text + eos`` for plain text.
Everything else is labelled IGNORE_INDEX (-100).

How assistant spans are found without knowing the template: for each assistant turn ``i`` we
render ``messages[:i]`` with ``add_generation_prompt=True`` (the prompt up to where the model
starts writing) and ``messages[:i+1]`` (the same plus the turn). The characters between the two,
less trailing whitespace the template puts after the end-of-turn token, are the turn's response.
The whole conversation is tokenized once with character offsets, and a token is supervised when
it overlaps a response span. This needs a template that renders earlier turns the same way
whatever follows them (ChatML, Llama, SmolLM2, Mistral do); one that rewrites history (e.g. drops
earlier reasoning) is refused with a message saying what to do.

The tokenizer is passed in: this module imports no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rayapp.algorithms import IGNORE_INDEX
from rayapp.data.formats import NO_RESPONSE, OVERLONG, ChatExample, Message, RowError, SFTRecord, TextExample
from rayapp.errors import UserError

# Used for chat rows when the tokenizer has no chat template (or data.chat_template: never).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'assistant: ' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


class TemplateError(UserError, ValueError):
    """The chat template cannot be used to find the response tokens, or is missing."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the response tokens
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (the one test every caller asks)."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, chat_template: str = "auto") -> bool:
    """Whether rows are rendered with the tokenizer's own template (data.chat_template)."""
    has = has_chat_template(tokenizer)
    if chat_template == "always" and not has:
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise TemplateError(
            f"data.chat_template: 'always', but {name} has no chat template; "
            "use a model with one, or set data.chat_template: auto (plain text when missing) or never"
        )
    return chat_template != "never" and has


def _render(tokenizer, messages: list[Message], template: str | None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )


def render_conversation(tokenizer, messages: list[Message], chat_template: str = "auto") -> str:
    """The whole conversation as :func:`encode_example` renders it for training under
    ``data.chat_template`` (the tokenizer's template, or PLAIN_CHAT_TEMPLATE): what a model trained
    on such rows (a reward model) must be shown when it scores."""
    return _render(tokenizer, messages, None if use_chat_template(tokenizer, chat_template) else PLAIN_CHAT_TEMPLATE)


def trained_chat_template(model_dir: str | Path) -> str:
    """The ``data.chat_template`` a job's model was trained with, from the config.resolved.yaml its
    job left beside model/ (or in it); 'auto' when there is none (a model from elsewhere)."""
    import yaml

    from rayapp.config.loader import RESOLVED_CONFIG

    for d in (Path(model_dir), Path(model_dir).parent):
        if (d / RESOLVED_CONFIG).exists():
            resolved = yaml.safe_load((d / RESOLVED_CONFIG).read_text()) or {}
            return (resolved.get("data") or {}).get("chat_template", "auto")
    return "auto"


def response_spans(tokenizer, messages: list[Message], template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span ``[start, end)`` of every assistant turn."""
    full = _render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], template)
        if not upto.startswith(prompt) or not full.startswith(upto):
            raise TemplateError(
                f"the chat template renders turn {i} differently once later turns are added "
                "(it rewrites history, e.g. drops earlier reasoning), so the response tokens cannot be found; "
                "split multi-turn rows into one row per assistant turn, or set data.chat_template: never"
            )
        spans.append((len(prompt), len(upto.rstrip())))
    return full, spans


def _tokenize_masked(tokenizer, text: str, spans: list[tuple[int, int]], add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels that keep the tokens overlapping ``spans``.

    A token that straddles the prompt/response boundary (BPE merging ``" 4"`` after ``"assistant:"``)
    carries response text, so it is supervised."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:  # the Rust tokenizer directly: same ids and offsets, a third of the overhead
        enc = backend.encode(text, add_special_tokens=add_special_tokens)
        ids, labels, spans = list(enc.ids), [], sorted(spans)
        k = 0  # spans are sorted and offsets increase: walk both once
        for t, (a, b) in zip(ids, enc.offsets, strict=True):
            while k < len(spans) and spans[k][1] <= a:
                k += 1
            labels.append(t if k < len(spans) and a < spans[k][1] and b > spans[k][0] else IGNORE_INDEX)
        return ids, labels
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    # Slow tokenizers have no offsets: a span covers the tokens between its tokenized prefixes.
    labels = [IGNORE_INDEX] * len(ids)
    for s, e in spans:
        lo, hi = (len(tokenizer(text[:c], add_special_tokens=add_special_tokens)["input_ids"]) for c in (s, e))
        labels[lo:hi] = ids[lo:hi]
    return ids, labels


def encode_example(
    tokenizer,
    record: SFTRecord,
    max_seq_len: int,
    chat_template: str = "auto",
    overlong: str = "truncate",
) -> Encoded:
    """Token ids and labels of one tuning record (loss on the response tokens only).

    ``chat_template``: 'auto' | 'always' | 'never' (data.chat_template). ``overlong``: 'truncate'
    cuts on the right and flags ``truncated``; 'bad_row' raises RowError. An example left with no
    supervised token always raises RowError ("response truncated away").
    """
    templated = use_chat_template(tokenizer, chat_template)
    if isinstance(record, TextExample) and not templated:
        field = "output_text"
        text = record.input_text + record.output_text
        ids, labels = _tokenize_masked(tokenizer, text, [(len(record.input_text), len(text))], add_special_tokens=True)
        if tokenizer.eos_token_id is not None:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    else:
        if isinstance(record, TextExample):
            messages, field = [{"role": "user", "content": record.input_text}, {"role": "assistant", "content": record.output_text}], "output_text"
        elif isinstance(record, ChatExample):
            messages, field = record.messages, record.field
        else:
            raise TypeError(f"encode_example: expected a TextExample or ChatExample, got {type(record).__name__}")
        text, spans = response_spans(tokenizer, messages, None if templated else PLAIN_CHAT_TEMPLATE)
        ids, labels = _tokenize_masked(tokenizer, text, spans, add_special_tokens=False)

    truncated = False
    if len(ids) > max_seq_len:
        if overlong == "bad_row":
            raise RowError(
                field if field != "output_text" else "input_text",
                f"{len(ids)} tokens, longer than model.max_seq_len={max_seq_len} (data.overlong: bad_row); "
                "shorten the row, raise model.max_seq_len, or set data.overlong: truncate",
                OVERLONG,
            )
        ids, labels, truncated = ids[:max_seq_len], labels[:max_seq_len], True
    encoded = Encoded(ids, labels, truncated)
    if encoded.num_supervised == 0:
        if truncated:
            raise RowError(
                field,
                f"response truncated away: the prompt alone fills model.max_seq_len={max_seq_len}; raise model.max_seq_len",
                NO_RESPONSE,
            )
        raise RowError(field, "no response tokens to learn from", NO_RESPONSE)
    return encoded
