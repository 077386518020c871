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

from rayapp.data.formats import parse_sft_row
from rayapp.data.loaders import load_records, split_indices
from rayapp.data.stats import DatasetStats
from rayapp.data.tokenize import Encoded, encode_example


@dataclass
class SFTDataset:
    examples: list[Encoded]
    stats: DatasetStats = field(default_factory=DatasetStats)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Encoded:
        return self.examples[i]


def load_sft_dataset(path: str | os.PathLike, tokenizer, data_cfg=None, max_seq_len: int = 512) -> SFTDataset:
    """Every row of ``path`` as an Encoded example; bad rows raise DataError or are dropped and counted."""
    fmt = getattr(data_cfg, "format", "auto")
    chat_template = getattr(data_cfg, "chat_template", "auto")
    overlong = getattr(data_cfg, "overlong", "truncate")

    def parse(row: dict) -> Encoded:
        return encode_example(tokenizer, parse_sft_row(row, fmt), max_seq_len, chat_template, overlong)

    examples, stats = load_records(path, parse, data_cfg, "tuning examples")
    return SFTDataset(examples, stats)


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
        SFTDataset(train, _restat(train, source, dataset.stats)),
        SFTDataset(val, _restat(val, f"{source} (validation_split={fraction:g}, seed={seed})")),
    )


def load_sft_splits(data_cfg, tokenizer, max_seq_len: int, seed: int = 0) -> tuple[SFTDataset, SFTDataset | None]:
    """(train, validation) for a job: ``data.validation`` if given, else ``data.validation_split`` of train, else None."""
    train = load_sft_dataset(data_cfg.train, tokenizer, data_cfg, max_seq_len)
    if getattr(data_cfg, "validation", None):
        return train, load_sft_dataset(data_cfg.validation, tokenizer, data_cfg, max_seq_len)
    if getattr(data_cfg, "validation_split", 0.0) > 0:
        return split_validation(train, data_cfg.validation_split, seed)
    return train, None
