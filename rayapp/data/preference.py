"""Preference pairs for the reward model and DPO: read, encode (prompt + chosen, prompt + rejected),
split off validation, collate.

``load_pair_splits(data_cfg, tokenizer, max_seq_len, seed)`` reads either preference format (bad
rows follow ``data.on_bad_rows``) and returns encoded pairs with their stats, as
:func:`rayapp.data.sft.load_sft_splits` does for tuning rows. torch is imported inside
:func:`collate_pairs` only.
"""

from __future__ import annotations

from rayapp.data.formats import ChatExample, parse_preference
from rayapp.data.loaders import load_records, split_indices
from rayapp.data.tokenize import encode_example


def encode_pair(tokenizer, pair, max_seq_len: int, chat_template: str = "auto", overlong: str = "truncate") -> dict:
    """A PreferencePair as two Encoded conversations (prompt + chosen, prompt + rejected)."""

    def enc(response: str, field: str):
        record = ChatExample(pair.prompt_messages + [{"role": "assistant", "content": response}], field)
        return encode_example(tokenizer, record, max_seq_len, chat_template, overlong)

    return {"chosen": enc(pair.chosen, "chosen"), "rejected": enc(pair.rejected, "rejected")}


def load_pair_splits(d, tokenizer, max_seq_len: int, seed: int = 0) -> tuple[list[dict], list[dict] | None, dict]:
    """(train pairs, validation pairs or None, stats dict) for the DataConfig ``d``; bad rows raise
    DataError (file:line: field) under ``on_bad_rows: error``."""

    def parse(row: dict) -> dict:
        return encode_pair(tokenizer, parse_preference(row), max_seq_len, d.chat_template, d.overlong)

    train, train_stats = load_records(d.train, parse, d, "preference pairs")
    stats = {"train": pair_stats(train, train_stats.to_dict())}
    val = None
    if d.validation:
        val, val_stats = load_records(d.validation, parse, d, "preference pairs")
        stats["validation"] = pair_stats(val, val_stats.to_dict())
    elif d.validation_split > 0:
        keep, held = split_indices(len(train), d.validation_split, seed)
        train, val = [train[i] for i in keep], [train[i] for i in held]
        stats["validation"] = {"pairs": len(val), "source": f"{d.train} (validation_split={d.validation_split:g})"}
    return train, val, stats


def pair_stats(items: list[dict], base: dict) -> dict:
    lengths = [len(it[k].input_ids) for it in items for k in ("chosen", "rejected")]
    return {
        "source": base.get("source"),
        "rows": base.get("rows"),
        "pairs": len(items),
        "dropped": base.get("dropped", 0),
        "tokens_mean": round(sum(lengths) / max(1, len(lengths)), 1),
        "tokens_max": max(lengths, default=0),
        "truncated": sum(1 for it in items for k in ("chosen", "rejected") if it[k].truncated),
    }


def format_pair_stats(stats: dict) -> str:
    """The stats of :func:`load_pair_splits` as the lines ``rayapp validate`` prints."""
    return "\n".join(f"{split}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for split, s in stats.items())


def collate_pairs(items: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows: input_ids / attention_mask / labels (2B, T); ``pairs`` = B.
    Precomputed reference log-probs, when present, as ``ref_chosen`` / ``ref_rejected`` (B,)."""
    import torch

    from rayapp.data.collate import collate_sft

    batch = collate_sft([it["chosen"] for it in items] + [it["rejected"] for it in items], pad_id)
    batch["pairs"] = len(items)
    if items and items[0].get("ref") is not None:
        batch["ref_chosen"] = torch.tensor([it["ref"][0] for it in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([it["ref"][1] for it in items], dtype=torch.float32)
    return batch


def count_pairs(batch) -> int:
    """The step loop's ``count_fn`` when the unit is a preference pair."""
    return int(batch["pairs"])
