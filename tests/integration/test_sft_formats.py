"""SFT on chat (`messages`) and Gemini-style `contents` rows, end to end through `rayapp run`'s path
(kinds.run -> Ray Train on the shared cluster): one launch trains on a file mixing both formats and
validates on `contents` rows; the supervised tokens of a real collated batch are the assistant turns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rayapp.algorithms import IGNORE_INDEX
from rayapp.config import load_job
from rayapp.data.readers import read_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "You add and subtract."


def _conversations(rows: list[dict]) -> list[list[dict]]:
    """Two arithmetic rows per conversation: system, user, assistant, user, assistant."""
    out = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        out.append([{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": a["input_text"]}, {"role": "assistant", "content": a["output_text"]},
                    {"role": "user", "content": b["input_text"]}, {"role": "assistant", "content": b["output_text"]}])
    return out


def _as_contents(messages: list[dict]) -> dict:
    role = {"user": "user", "assistant": "model"}
    return {"systemInstruction": {"parts": [{"text": messages[0]["content"]}]},
            "contents": [{"role": role[m["role"]], "parts": [{"text": m["content"]}]} for m in messages[1:]]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assistant_runs(labels: list[int]) -> list[list[int]]:
    """The supervised tokens as maximal runs of consecutive positions."""
    runs, cur = [], []
    for t in labels:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_sft_on_chat_and_contents_rows_masks_all_but_assistant_turns_and_lowers_loss(ray_cluster, tmp_path,
                                                                                     tiny_tokenizer):
    from rayapp import kinds
    from rayapp.data.collate import collate_sft
    from rayapp.training.sft import load_data

    convs = _conversations(read_jsonl(ROOT / "data/sft_tiny/train.jsonl"))  # 128
    train = _write(tmp_path / "train.jsonl",
                   [{"messages": c} if i % 2 == 0 else _as_contents(c) for i, c in enumerate(convs)])
    val_convs = _conversations(read_jsonl(ROOT / "data/sft_tiny/val.jsonl"))  # 16, none seen in training
    val = _write(tmp_path / "val.jsonl", [_as_contents(c) for c in val_convs])
    out = tmp_path / "sft"
    cfg = load_job(ROOT / "jobs/sft_tiny.yaml", [
        f"output_dir={out}", f"data.train={train}", f"data.validation={val}", "model.max_seq_len=128",
        "train.max_steps=16", "train.eval_every=8", "train.checkpoint_every=16"])

    # The mask, on a batch collated as the workers collate it: for a chat row and its contents twin, the
    # supervised tokens are exactly the two assistant turns, each with the template's end of turn, and
    # nothing of the system prompt, the user turns or the role headers.
    tok = tiny_tokenizer
    assert "<|im_start|>" in tok.chat_template  # ChatML: an assistant turn is "<|im_start|>assistant\n...<|im_end|>"
    train_ds, val_ds = load_data(cfg, tok)
    assert (len(train_ds), len(val_ds)) == (128, 16)  # every row read, in both formats
    batch = collate_sft(train_ds.examples[:4], tok.pad_token_id)
    for i, conv in enumerate(convs[:4]):
        text = tok.apply_chat_template(conv, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == enc["input_ids"]
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, n:] == 0).all()
        # the assistant spans, found from the template's own markers: content + <|im_end|>
        spans = [(m.start(1), m.end(1)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]
        assert len(spans) == 2
        want = [t if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
                for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
        assert batch["labels"][i, :n].tolist() == want
        runs = [tok.decode(r) for r in _assistant_runs(batch["labels"][i, :n].tolist())]
        assert [r.strip() for r in runs] == [conv[2]["content"] + "<|im_end|>", conv[4]["content"] + "<|im_end|>"], runs
        assert SYSTEM not in "".join(runs) and conv[1]["content"] not in "".join(runs)
    # Rows 1 and 3 above were contents rows: the same ids and mask as the conversation they were written from.
    for conv, example in zip(val_convs, val_ds.examples, strict=True):
        text = tok.apply_chat_template(conv, tokenize=False)
        assert example.input_ids == tok(text, add_special_tokens=False)["input_ids"]
        runs = [tok.decode(r).strip() for r in _assistant_runs(example.labels)]
        assert runs == [conv[2]["content"] + "<|im_end|>", conv[4]["content"] + "<|im_end|>"], runs

    summary = kinds.run(cfg)  # what `rayapp run` calls
    rows = read_jsonl(out / "metrics.jsonl")
    train_loss = [r["loss"] for r in rows if "loss" in r]
    assert len(train_loss) == 16 and train_loss[-1] < train_loss[0] - 0.5, train_loss
    vals = [r["val_loss"] for r in rows if "val_loss" in r]  # on the contents rows
    assert len(vals) >= 2 and vals[-1] < vals[0] - 0.3, vals
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["examples"] == 128 and stats["validation"]["examples"] == 16
    assert stats["train"]["truncated"] == stats["validation"]["truncated"] == 0
    assert stats["train"]["supervised_tokens"] == sum(e.num_supervised for e in train_ds.examples)
    assert list(Path(summary["model"]).glob("*.safetensors"))
