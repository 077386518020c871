"""Tuning data: read, validate and tokenize a file into examples with loss masks, plus its stats.

``load_sft_dataset(path, tokenizer, data_cfg, max_seq_len)`` reads text or chat rows
(``data.format``), renders them (``data.chat_template``), masks everything but the responses,
handles over-long rows (``data.overlong``) and applies ``data.on_bad_rows``.
``load_sft_splits`` adds the validation set: ``data.validation`` or a seeded
``data.validation_split`` of train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from rayapp.data.formats import ChatExample, parse_sft_row
from rayapp.data.loaders import load_records, split_indices
from rayapp.data.stats import DatasetStats
from rayapp.data.tokenize import Encoded, encode_example


@dataclass
class SFTDataset:
    examples: list[Encoded]
    stats: DatasetStats = field(default_factory=DatasetStats)
    prompts: list[str] = field(default_factory=list)  # prompts[i]: what examples[i] answers (see prompt_of)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Encoded:
        return self.examples[i]


def prompt_of(record) -> str:
    """The prompt a tuning record answers: its input_text, or a chat row's last user turn."""
    if isinstance(record, ChatExample):
        users = [m.get("content", "") for m in record.messages if m.get("role") == "user"]
        return users[-1] if users else ""
    return record.input_text


def load_sft_dataset(path: str | os.PathLike, tokenizer, data_cfg=None, max_seq_len: int = 512) -> SFTDataset:
    """Every row of ``path`` as an Encoded example (and its prompt); bad rows raise DataError or are
    dropped and counted."""
    fmt = getattr(data_cfg, "format", "auto")
    chat_template = getattr(data_cfg, "chat_template", "auto")
    overlong = getattr(data_cfg, "overlong", "truncate")

    def parse(row: dict) -> tuple[str, Encoded]:
        record = parse_sft_row(row, fmt)
        return prompt_of(record), encode_example(tokenizer, record, max_seq_len, chat_template, overlong)

    rows, stats = load_records(path, parse, data_cfg, "tuning examples")
    return SFTDataset([e for _, e in rows], stats, [p for p, _ in rows])


def _restat(examples: list[Encoded], source: str, base: DatasetStats | None = None) -> DatasetStats:
    stats = DatasetStats(source=source, rows=len(examples))
    if base is not None:  # keep what was read and dropped; recount the kept examples
        stats = replace(stats, rows=base.rows, drop_reasons=base.drop_reasons.copy(), bad_rows=list(base.bad_rows))
    for e in examples:
        stats.add_example(e)
    return stats


def split_validation(dataset: SFTDataset, fraction: float, seed: int = 0) -> tuple[SFTDataset, SFTDataset]:
    """Hold out a seeded ``fraction`` of ``dataset`` (data.validation_split); each part gets its own stats."""
    train_idx, val_idx = split_indices(len(dataset), fraction, seed)
    train = [dataset.examples[i] for i in train_idx]
    val = [dataset.examples[i] for i in val_idx]
    source = dataset.stats.source
    return (
        SFTDataset(train, _restat(train, source, dataset.stats), [dataset.prompts[i] for i in train_idx]),
        SFTDataset(val, _restat(val, f"{source} (validation_split={fraction:g}, seed={seed})"), [dataset.prompts[i] for i in val_idx]),
    )


def load_sft_splits(data_cfg, tokenizer, max_seq_len: int, seed: int = 0) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, validation) for a job: ``data.validation`` if given, else ``data.validation_split`` of train, else None."""
    train = load_sft_dataset(data_cfg.train, tokenizer, data_cfg, max_seq_len)
    if getattr(data_cfg, "validation", None):
        return train, load_sft_dataset(data_cfg.validation, tokenizer, data_cfg, max_seq_len)
    if getattr(data_cfg, "validation_split", 0.0) > 0:
        return split_validation(train, data_cfg.validation_split, seed)
    return train, None
