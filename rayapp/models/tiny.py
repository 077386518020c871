"""A small Llama-style model built from a config, with a byte-level BPE tokenizer trained locally.

Nothing is downloaded: the tokenizer is trained on a corpus generated here (short English
sentences and arithmetic), and the weights are randomly initialised from a fixed seed. The
attention head size is 64, which vLLM's CPU attention kernels accept (16 is refused).

The result is a regular Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template) that transformers, peft and
vLLM all load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from rayapp.fileio import replace_dir_atomic

# ChatML-style template. `{% generation %}` marks are not used: loss masks are computed by
# rendering the conversation prefix by prefix (rayapp.data.tokenize), which works for any template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head size 64
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0
    version: int = 1  # bump when the corpus or template changes

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


# Short names accepted in "tiny:layers=4,hidden=256" model references.
_SPEC_ALIASES = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
                 "heads": "num_attention_heads", "vocab": "vocab_size", "seed": "seed"}


def parse_tiny_ref(ref: str) -> TinySpec:
    """'tiny' -> the default spec; 'tiny:layers=4,hidden=256' -> a bigger one.

    Keys: layers, hidden, intermediate, heads, vocab, seed (or TinySpec's field names). With
    ``hidden`` and no ``heads``, heads follow hidden / 64 (vLLM's CPU kernels need head size 64)
    and ``intermediate`` follows 2.75 x hidden, as in the default.
    """
    if ref == "tiny":
        return TinySpec()
    if not ref.startswith("tiny:"):
        raise ValueError(f"not a tiny model reference: {ref!r}")
    fields = {f for f in TinySpec.__dataclass_fields__ if f != "version"}
    values: dict[str, int] = {}
    for part in filter(None, ref[len("tiny:"):].split(",")):
        key, sep, raw = part.partition("=")
        name = _SPEC_ALIASES.get(key.strip(), key.strip())
        if not sep or name not in fields:
            raise ValueError(f"{ref!r}: {part!r} is not KEY=INT with KEY one of {', '.join(_SPEC_ALIASES)}")
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"{ref!r}: {key}={raw!r} is not an integer") from None
        if values[name] <= 0 and name != "seed":
            raise ValueError(f"{ref!r}: {key} must be positive")
    if "hidden_size" in values:
        values.setdefault("num_attention_heads", max(1, values["hidden_size"] // 64))
        values.setdefault("intermediate_size", values["hidden_size"] * 11 // 4)
    if "num_attention_heads" in values:
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
    spec = TinySpec(**values)
    if spec.hidden_size % spec.num_attention_heads or spec.hidden_size // spec.num_attention_heads != 64:
        raise ValueError(f"{ref!r}: head size is hidden / heads = {spec.hidden_size / spec.num_attention_heads:g}; "
                         "vLLM's CPU attention needs 64 (give hidden as a multiple of 64)")
    return spec


_WORDS = (
    "the a an of to and in is it that for on with as was at by be this are from or have not but what all were "
    "when we there can your which their if do will each about how up out them then she many some so these would "
    "other into has more two like him see time could no make than first been its who now people my made over did "
    "down only way find use may water long little very after words called just where most know get through back "
    "much before go good new write our used me man too any day same right look think also around another came come "
    "work three word must because does part even place well such here take why things help put years different away "
    "again off went old number great tell men say small every found still between name should home big give air "
    "line set own under read last never us left end along while might next sound below saw something thought both "
    "few those always looked show large often together asked house world going want school important until form "
    "food keep children feet land side without boy once animals life enough took sometimes four head above kind "
    "began almost live page got earth need far hand high year mother light parts country father let night following "
    "question answer explain predict so therefore because total each sum difference product apples books coins "
    "marbles students friends buys sells gives has have more fewer left remaining yes no true false reason step "
    "user assistant system model please thanks hello"
).split()


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.45:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".?!"))
        elif kind < 0.8:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            val = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {val}. So the answer is {val}.")
        else:
            lines.append(json.dumps({"q": rng.choice(_WORDS), "n": rng.randint(0, 10**6)}) + " #### " + str(rng.randint(0, 99)))
    return lines


def train_tokenizer(out_dir: Path, vocab_size: int, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(6000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny model into ``out_dir`` (atomically) and return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        tokenizer = train_tokenizer(tmp, spec.vocab_size, spec.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            torch_dtype="float32",
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "rayapp_tiny.json").write_text(json.dumps(asdict(spec), indent=2))

    return replace_dir_atomic(out_dir, write)
