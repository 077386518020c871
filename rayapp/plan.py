"""``rayapp plan JOB.yaml``: the resources, memory per device and compute a job will take.

Nothing is loaded but config.json (and the safetensors headers, when weights are present), so a
user can plan a 70B run from a directory that holds only the model's config.json.

Symbols: P parameters, A trainable LoRA parameters, b bytes per weight (4 float32, 2 bfloat16 /
float16), N workers, B micro-batch, s sequence length (model.max_seq_len), h hidden size, L layers,
V vocabulary, d head size, T tokens.

Parameters of a dense Llama-style decoder, from config.json (exact counts from safetensors headers
are used instead when the weights are there):
    P = V*h*(1 + untied) + L*(h*q_heads*d + 2*h*kv_heads*d + q_heads*d*h + 3*h*I + 2*h) + h
LoRA on a linear (in -> out) adds rank*(in + out) parameters; "all-linear" means q, k, v, o,
gate, up and down of every layer.

Memory per training worker. b is the weights' dtype as loaded (the master weights: 4 under
train.precision bf16-mixed, which requires model.dtype float32), c the compute dtype (2 for
bf16-mixed, else b). FSDP2 (resources.strategy: fsdp) shards every parameter on dim 0 over N
workers, so a worker holds P_w = sum over the model's tensors of ceil(rows/N) * cols parameters
(P/N when N divides every dim 0; the worker with the most rows is counted); DDP keeps a full
replica on each worker (P_w = P):
    weights      P_w*b            (+ A*4/N_fsdp: peft keeps adapter weights in float32)
    gradients    P_w*b            full tuning; A*4/N_fsdp with LoRA (frozen weights get none)
    optimizer    8*P_w            AdamW's two float32 moments per trainable parameter (8*A/N_fsdp for LoRA)
    gathered     working copies beyond those: FSDP2 all-gathers one unit at a time in c bytes, the
                 root unit (embeddings, final norm, lm_head: R parameters) for the whole step and
                 two decoder layers (D parameters each: the one computing and the one prefetched),
                 and in backward a unit's full gradient exists in c bytes (plus its float32 copy
                 for the reduction under bf16-mixed) until it is reduce-scattered:
                     c*(R + 2*D) + (c + 4*mixed)*max(R, D)     (full tuning; with LoRA the gradient
                                                                term is for the adapters only)
                 DDP or one worker under bf16-mixed: autocast's bf16 copy of the weights, kept for
                 backward: 2*P. Nothing for DDP in fp32.
    activations  B*s*h*L*34*(c/2) + B*s*V*4*2 (+ B*s*V*2 for the bf16 logits under bf16-mixed)
                 34 bytes per token per hidden unit per layer in 16-bit is Korthikanti et al. (2022)
                 for a layer without recomputation and with fused attention (no a*s^2 score term);
                 the second term is the float32 logits and their gradient. With
                 train.activation_checkpointing each layer keeps only its input, B*s*h*c, and one
                 layer at a time is recomputed: B*s*h*(L*c + 34*c/2).
Memory per vLLM engine (tensor parallelism splits weights and cache over tp devices):
    weights      P*b_engine / tp
    KV cache     2*L*kv_heads*d*b_engine*tokens / tp; "full batch" is max_num_seqs*max_model_len tokens.
                 On GPU vLLM takes gpu_memory_utilization of the device and the cache gets what the
                 weights leave; on CPU the cache is engine.kv_cache_gib (VLLM_CPU_KVCACHE_SPACE).
A device fits when the estimate is at most 90% of its memory (the rest: CUDA context, allocator
fragmentation). CPU workers on one host share its memory, so each gets host memory / N.

Compute (upper bounds: every example counted at max_seq_len, every completion at max_tokens):
    training FLOPs    6*P*T full tuning, 4*P*T with LoRA (no weight-gradient matmuls for frozen
                      weights); T = optimizer steps * global_batch_size * max_seq_len
    generation FLOPs  2*P_engine per token, T = prompts * n * (max_model_len) per pass
    GPU-hours         FLOPs / (MFU * peak) / 3600, by default MFU 40% of an H100's dense bf16
                      peak of 989 TFLOP/s (--mfu, --peak-tflops)
    cost              GPU-hours x --usd-per-gpu-hour
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rayapp.errors import UserError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER_16BIT = 34  # Korthikanti et al. 2022, fused attention
ADAMW_BYTES_PER_PARAM = 8
LORA_DTYPE_BYTES = 4
USABLE_FRACTION = 0.9
DEFAULT_GPU_GIB = 80.0
H100_BF16_DENSE_TFLOPS = 989.0
DEFAULT_MFU = 0.40
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from a model's config.json."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = True
    attention_bias: bool = False
    exact_params: int | None = None  # from safetensors headers, when the weights are present

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        hidden = cfg.get("hidden_size", cfg.get("n_embd"))
        layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        vocab = cfg.get("vocab_size")
        if None in (hidden, layers, heads, vocab):
            raise KeyError("hidden_size, num_hidden_layers, num_attention_heads and vocab_size")
        return cls(
            vocab=vocab,
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate=cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden,
            tied=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )

    @property
    def formula_params(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h
        if self.attention_bias:
            attn += (self.heads + 2 * self.kv_heads) * d
        per_layer = attn + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    @property
    def params(self) -> int:
        return self.exact_params or self.formula_params

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, rank: int, target_modules: list[str] | str = "all-linear") -> int:
        shapes = self.linear_shapes()
        names = LINEAR_NAMES if target_modules in ("all-linear", ["all-linear"]) else target_modules
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise PlanError(
                f"adapter.target_modules: {unknown} are not linear layers plan knows "
                f"(expected some of {', '.join(LINEAR_NAMES)} or 'all-linear')"
            )
        return self.layers * sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes of one decoder layer: attention, MLP and the two norms."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i), (h,), (h,)]
        if self.attention_bias:
            shapes += [(q,), (kv,), (kv,)]
        return shapes

    def root_shapes(self) -> list[tuple[int, ...]]:
        """What is not in a decoder layer: embeddings, lm_head when untied, final norm."""
        return [(self.vocab, self.hidden)] * (1 if self.tied else 2) + [(self.hidden,)]

    @property
    def layer_params(self) -> int:
        return sum(math.prod(t) for t in self.layer_shapes())

    @property
    def root_params(self) -> int:
        return sum(math.prod(t) for t in self.root_shapes())

    def shard_params(self, workers: int) -> float:
        """Parameters the most loaded FSDP2 worker holds (params / workers when every dim 0 divides).
        When safetensors headers give a count other than the formula's, it is scaled to that count."""
        sharded = fsdp_shard_params(self.root_shapes(), workers) + self.layers * fsdp_shard_params(self.layer_shapes(), workers)
        return sharded if self.params == self.formula_params else sharded * self.params / self.formula_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def safetensors_params(model_dir: Path) -> int | None:
    """Parameter count from the safetensors headers (8-byte length + JSON); no tensor is read."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def model_shape(ref: str, where: str = "model.path") -> ModelShape:
    """Read the shape of a built-in model name, a directory holding at least config.json, or a Hugging
    Face Hub id (only its config.json is fetched, or read from the cache)."""
    from rayapp.models.hub import hub_config_json, parse_hub_ref
    from rayapp.models.io import BUILTIN_NAMES, resolve_model

    path = resolve_model(ref) if ref in BUILTIN_NAMES or ref.startswith("tiny:") else Path(ref).expanduser()
    hub = parse_hub_ref(ref) if not path.exists() else None
    if hub is not None:
        path = hub_config_json(ref, hub, where).parent
    config = path / "config.json"
    if not config.exists():
        raise PlanError(
            f"{where}: '{ref}' has no config.json here ({config}); plan reads only the model's "
            "config.json, so a local directory holding just that file is enough"
        )
    try:
        shape = ModelShape.from_config(json.loads(config.read_text()))
    except KeyError as e:
        raise PlanError(f"{where}: {config} lacks {e.args[0]}; plan supports dense decoder configs") from None
    return replace(shape, exact_params=safetensors_params(path))


@dataclass
class Memory:
    """Bytes per device, by part."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    gathered: float = 0.0  # working copies: FSDP2's gathered units, autocast's bf16 weights
    activations: float = 0.0
    kv_cache: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.kv_cache


def fsdp_shard_params(shapes: list[tuple[int, ...]], workers: int) -> int:
    """Parameters the most loaded of ``workers`` holds when FSDP2 splits each tensor on dim 0
    (torch.chunk: ceil(rows / workers) rows each, the last ranks get fewer)."""
    return sum(-(-t[0] // workers) * math.prod(t[1:]) for t in shapes)


def training_memory(
    shape: ModelShape,
    dtype: str = "float32",
    micro_batch: int = 1,
    seq_len: int = 512,
    lora_params: int = 0,
    num_workers: int = 1,
    strategy: str = "ddp",
    precision: str = "fp32",
    activation_checkpointing: bool = False,
) -> Memory:
    """Memory of one training worker (the formulas in the module docstring). ``precision`` is
    resolved ('fp32' or 'bf16-mixed', see TrainConfig.resolved_precision)."""
    if precision not in ("fp32", "bf16-mixed"):
        raise ValueError(f"precision {precision!r}: expected 'fp32' or 'bf16-mixed' (resolve 'auto' first)")
    mixed = precision == "bf16-mixed"
    b, p = DTYPE_BYTES[dtype], shape.params
    c = 2 if mixed else b
    fsdp = strategy == "fsdp"
    n = num_workers if fsdp else 1
    held = shape.shard_params(n) if fsdp else p  # parameters this worker keeps
    lora = LORA_DTYPE_BYTES * lora_params / n
    B, s, h, L, V = micro_batch, seq_len, shape.hidden, shape.layers, shape.vocab
    if fsdp:
        root, layer = shape.root_params, shape.layer_params
        grad_unit = lora_params / L if lora_params else max(root, layer)
        gathered = c * (root + 2 * layer) + (c + 4 * mixed) * grad_unit
    else:
        gathered = 2 * p if mixed else 0.0
    per_layer = ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER_16BIT * c / 2
    act = B * s * h * (L * c + per_layer) if activation_checkpointing else B * s * h * L * per_layer
    logits = B * s * V * (4 * 2 + (2 if mixed else 0))
    return Memory(
        weights=held * b + lora,
        gradients=lora if lora_params else held * b,
        optimizer=ADAMW_BYTES_PER_PARAM * (lora_params / n if lora_params else held),
        gathered=gathered,
        activations=act + logits,
    )


def engine_memory(shape: ModelShape, dtype: str, tokens: int, tensor_parallel: int = 1) -> Memory:
    """Memory of one vLLM engine's device: weights and a KV cache holding ``tokens`` tokens."""
    b = DTYPE_BYTES[dtype]
    return Memory(weights=shape.params * b / tensor_parallel,
                  kv_cache=shape.kv_bytes_per_token(b) * tokens / tensor_parallel)


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def count_rows(path: str | None) -> int | None:
    """Rows of a local .jsonl / .parquet file (None when it is not here, e.g. on shared storage)."""
    if not path or not Path(path).is_file():
        return None
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


@dataclass
class Part:
    """One thing the job places on devices: a training worker group or a vLLM engine pool."""

    name: str
    count: int
    bundle: dict
    memory: Memory
    device: str
    device_bytes: float
    flops: float | None = None
    flops_note: str = ""
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= USABLE_FRACTION * self.device_bytes


@dataclass
class Plan:
    job: str
    kind: str
    parts: list[Part]
    mfu: float = DEFAULT_MFU
    peak_tflops: float = H100_BF16_DENSE_TFLOPS
    usd_per_gpu_hour: float | None = None

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.parts)

    @property
    def flops(self) -> float | None:
        known = [p.flops for p in self.parts if p.flops is not None]
        return sum(known) if known else None

    @property
    def gpu_hours(self) -> float | None:
        f = self.flops
        return None if f is None else f / (self.mfu * self.peak_tflops * 1e12) / 3600

    @property
    def usd(self) -> float | None:
        """GPU-hours x --usd-per-gpu-hour (None without a price or a FLOP count)."""
        hours = self.gpu_hours
        return None if hours is None or self.usd_per_gpu_hour is None else hours * self.usd_per_gpu_hour

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            for k, v in p.bundle.items():
                out[k] = out.get(k, 0.0) + v * p.count
        return out


def _device(use_gpu: bool, gib: float | None, sharing: int) -> tuple[str, float]:
    if gib is not None:
        return (f"{gib:g} GiB {'GPU' if use_gpu else 'device'} (resources.gpu_memory_gib)", gib * GIB)
    if use_gpu:
        return f"{DEFAULT_GPU_GIB:g} GiB GPU (default; set resources.gpu_memory_gib)", DEFAULT_GPU_GIB * GIB
    host = host_memory_bytes()
    return f"host memory {host / GIB:.1f} GiB / {sharing} sharing", host / sharing


def plan_training(cfg, label: str = "train") -> Part:
    """A training worker group: cfg has model, train, resources and optionally adapter and data."""
    r, t, m = cfg.resources, cfg.train, cfg.model
    shape = model_shape(m.path, f"{label}.model.path" if label != "train" else "model.path")
    adapter = getattr(cfg, "adapter", None)
    lora = shape.lora_params(adapter.rank, adapter.target_modules) if adapter else 0
    n = r.num_workers

    precision = t.resolved_precision(r.use_gpu)

    def mem(micro=t.micro_batch_size, lora_p=lora, strategy=r.strategy, ac=t.activation_checkpointing):
        return training_memory(shape, m.dtype, micro, m.max_seq_len, lora_p, n, strategy, precision, ac)

    device, dev_bytes = _device(r.use_gpu, r.gpu_memory_gib, 1 if r.use_gpu else n)
    bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {})}
    part = Part(f"{label}: Ray Train workers ({r.strategy}{', LoRA' if lora else ', full'})", n, bundle, mem(),
                device, dev_bytes)
    trainable = lora or shape.params
    part.notes.append(f"parameters {_count(shape.params)}, trainable {_count(trainable)}"
                      f" ({100 * trainable / shape.params:.2f}%)")
    part.notes.append(f"micro-batch {t.micro_batch_size} x seq {m.max_seq_len}, weights {m.dtype}, precision {precision}"
                      f"{', activation checkpointing' if t.activation_checkpointing else ''}, "
                      f"gradient accumulation {getattr(cfg, 'grad_accum_steps', '?')}")
    if r.strategy == "fsdp":
        part.notes.append(f"fsdp: each worker holds {shape.shard_params(n) / shape.params:.2%} of the parameters, gradients and "
                          f"optimizer state; units gathered one at a time (root + 2 decoder layers)")
    ps = r.placement_strategy
    if r.use_gpu:
        nodes = n if "SPREAD" in ps else math.ceil(n * r.gpus_per_worker / 8)
        part.notes.append(f"placement group: {n} bundles {bundle}, strategy {ps} "
                          f"({'up to ' if ps == 'SPREAD' else '>= '}{nodes} node(s) of 8 GPUs)")
    else:
        part.notes.append(f"placement group: {n} bundles {bundle}, strategy {ps}")
    # Compute
    rows = count_rows(getattr(getattr(cfg, "data", None), "train", None))
    if rows is not None:
        data = cfg.data
        rows = min(rows, data.max_rows) if data.max_rows else rows
        rows = int(rows * (1 - data.validation_split))
    steps = cfg.planned_steps(rows) if hasattr(cfg, "planned_steps") else (t.max_steps or None)
    if steps is not None:
        tokens = steps * t.global_batch_size * m.max_seq_len
        part.flops = (4 if lora else 6) * shape.params * tokens
        part.flops_note = f"{'4' if lora else '6'} x {_count(shape.params)} params x {_count(tokens)} tokens ({steps} steps)"
    else:
        part.flops_note = f"unknown: {cfg.data.train} is not here to count rows; set train.max_steps"
    if not part.fits:
        budget, now = USABLE_FRACTION * dev_bytes, part.memory.total

        def offer(text: str, alt: Memory) -> None:
            if alt.total < 0.9 * now:  # only what helps
                part.suggestions.append(f"{text}: {_gib(alt.total)} per worker" + (" - fits" if alt.total <= budget else ""))

        if not lora:
            offer("LoRA (adapter: {rank: 8})", mem(lora_p=shape.lora_params(8)))
        if r.strategy == "ddp" and n > 1:
            offer(f"resources.strategy: fsdp over {n} workers", mem(strategy="fsdp"))
        if not t.activation_checkpointing:
            offer("train.activation_checkpointing: true", mem(ac=True))
        # micro-batch must divide the per-worker batch so gradient accumulation keeps global_batch_size
        per_worker = t.global_batch_size // n
        smaller = [k for k in range(t.micro_batch_size - 1, 0, -1) if per_worker % k == 0]
        pick = next((k for k in smaller if mem(micro=k).total <= budget), smaller[-1] if smaller else None)
        if pick:
            offer(f"train.micro_batch_size: {pick} (gradient accumulation keeps global_batch_size)", mem(micro=pick))
        if r.use_gpu:
            part.suggestions.append("a device with more memory (resources.gpu_memory_gib), or more workers with fsdp")
    return part


def plan_engine(engine, model_ref: str, label: str, rows: int | None, sampling=None) -> Part:
    """A vLLM engine pool (EngineConfig); tokens for the full batch are max_num_seqs * max_model_len."""
    shape = model_shape(model_ref, f"{label} model")
    tp = engine.tensor_parallel_size
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if engine.use_gpu else "float32")
    device, dev_bytes = _device(engine.use_gpu, None, 1)

    def on_device(tp: int) -> tuple[Memory, float, int, Memory]:
        """Memory of one device at tensor parallelism tp, the cache it gets, how many sequences of
        max_model_len that cache holds, and what a full batch would need."""
        full, one = (engine_memory(shape, dtype, t, tp) for t in (engine.max_num_seqs * engine.max_model_len,
                                                                  engine.max_model_len))
        if engine.use_gpu:
            cache = max(0.0, engine.gpu_memory_utilization * dev_bytes - full.weights)
            mem = Memory(weights=full.weights, kv_cache=min(cache, full.kv_cache))
        else:
            cache = engine.kv_cache_gib * GIB
            mem = Memory(weights=full.weights, kv_cache=cache)
        return mem, cache, int(cache // max(1, one.kv_cache)), full

    mem, cache, seqs, full = on_device(tp)
    bundle = {"CPU": engine.cpus_per_engine, **({"GPU": float(tp)} if engine.use_gpu else {})}
    part = Part(f"{label}: vLLM engines ({model_ref}, tp={tp})", engine.num_engines, bundle, mem, device, dev_bytes)
    part.notes.append(f"parameters {_count(shape.params)}, {dtype}; KV cache {shape.kv_bytes_per_token(DTYPE_BYTES[dtype])} "
                      f"B/token; full batch {engine.max_num_seqs} x {engine.max_model_len} tokens needs {_gib(full.kv_cache)}")
    part.notes.append(f"cache holds {_gib(cache)}: about {seqs} sequence(s) of max_model_len at once")
    if seqs < 1 or (not part.fits):
        # the smallest larger tensor parallelism (powers of two, up to one 8-GPU node) that fits, with its estimate
        for more in (t for t in (2, 4, 8) if t > tp and engine.use_gpu):
            alt, _, alt_seqs, _ = on_device(more)
            if alt_seqs >= 1 and alt.total <= USABLE_FRACTION * dev_bytes:
                part.suggestions.append(f"engine.tensor_parallel_size: {more}: {_gib(alt.total)} per device "
                                        f"(weights {_gib(alt.weights)}), cache for about {alt_seqs} sequence(s) - fits")
                break
        part.suggestions.append("raise engine.tensor_parallel_size, lower engine.max_model_len, or use a smaller model")
    elif seqs < engine.max_num_seqs:
        part.suggestions.append(f"engine.max_num_seqs {engine.max_num_seqs} > {seqs} that fit: vLLM will batch fewer")
    if rows is not None:
        n = sampling.n if sampling is not None else 1
        tokens = rows * n * engine.max_model_len
        part.flops = 2 * shape.params * tokens
        part.flops_note = f"2 x {_count(shape.params)} params x {_count(tokens)} tokens ({rows} prompts x {n} x max_model_len)"
    else:
        part.flops_note = "unknown: no local prompt file to count"
    return part


def _walk(obj, path=()):
    """Yield (path, sub-config, parent) for every pydantic sub-model of a config."""
    from pydantic import BaseModel

    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                yield path + (name,), value, obj
                yield from _walk(value, path + (name,))
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        yield path + (name, i), item, obj
                        yield from _walk(item, path + (name, i))
            elif isinstance(value, dict):
                for k, item in value.items():
                    if isinstance(item, BaseModel):
                        yield path + (name, k), item, obj
                        yield from _walk(item, path + (name, k))


def _model_ref(holder, fallback) -> str | None:
    for name in ("model", "teacher_model", "model_path"):
        value = getattr(holder, name, None)
        if isinstance(value, str):
            return value
        if value is not None and isinstance(getattr(value, "path", None), str):
            return value.path
    return fallback


def estimate_plan(cfg, job: str = "job", mfu: float = DEFAULT_MFU, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
                  usd_per_gpu_hour: float | None = None) -> Plan:
    """Every training worker group and vLLM engine pool found anywhere in a job config, of any kind."""
    from rayapp.config.base import EngineConfig, ResourcesConfig, SamplingConfig, TrainConfig

    def is_training(c) -> bool:
        return isinstance(getattr(c, "train", None), TrainConfig) and isinstance(getattr(c, "resources", None), ResourcesConfig)

    parts: list[Part] = []
    if is_training(cfg):
        parts.append(plan_training(cfg))
    top_model = _model_ref(cfg, None)
    top_rows = count_rows(getattr(getattr(cfg, "data", None), "train", None))
    for path, sub, parent in _walk(cfg):
        label = ".".join(str(p) for p in path)
        if is_training(sub):
            parts.append(plan_training(sub, label))
        elif isinstance(sub, EngineConfig):
            ref = _model_ref(parent, top_model)
            if ref is None:
                raise PlanError(f"{label}: no model next to this engine section and no top-level model")
            data = getattr(parent, "data", None)
            prompts = (getattr(data, "train", None) or getattr(data, "prompts", None) or getattr(parent, "prompts", None)
                       or getattr(parent, "input", None))
            rows = count_rows(prompts) if isinstance(prompts, str) else top_rows
            if rows is not None and isinstance(getattr(parent, "max_rows", None), int):
                rows = min(rows, parent.max_rows)
            sampling = next((v for v in (getattr(parent, n, None) for n in type(parent).model_fields)
                             if isinstance(v, SamplingConfig)), None)
            part = plan_engine(sub, ref, label, rows, sampling)
            pool = getattr(parent, "concurrency", None)  # an autoscaling Ray Data actor pool: [min, max]
            if isinstance(pool, (list, tuple)) and len(pool) == 2 and all(isinstance(x, int) for x in pool):
                part.count = max(pool)
                part.notes.append(f"autoscaling pool of {pool[0]}..{pool[1]} engine replicas; totals count {pool[1]}")
            parts.append(part)
    return Plan(job, getattr(cfg, "kind", "?"), parts, mfu, peak_tflops, usd_per_gpu_hour)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def format_plan(plan: Plan) -> str:
    lines = [f"plan for {plan.job} (kind: {plan.kind})"]
    if not plan.parts:
        lines.append("  no training workers or vLLM engines in this job: it runs in the driver (1 CPU)")
    for p in plan.parts:
        m = p.memory
        lines.append(f"\n{p.name}: {p.count} x {p.bundle}")
        lines += [f"  {note}" for note in p.notes]
        lines.append(f"  memory per device: weights {_gib(m.weights)}, gradients {_gib(m.gradients)}, "
                     f"optimizer {_gib(m.optimizer)}, gathered {_gib(m.gathered)}, activations {_gib(m.activations)}, "
                     f"KV cache {_gib(m.kv_cache)}")
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"  total {_gib(m.total)} of {p.device}: {verdict} (limit {USABLE_FRACTION:.0%})")
        lines += [f"  suggestion: {s}" for s in p.suggestions]
        lines.append(f"  compute: {_flops(p.flops)} = {p.flops_note}")
    totals = plan.totals()
    lines.append("\nasks for: " + (", ".join(f"{v:g} {k}" for k, v in totals.items()) or "1 CPU"))
    if plan.flops is not None:
        hours = plan.gpu_hours
        cost = f", ${plan.usd:,.2f} at ${plan.usd_per_gpu_hour:g}/GPU-hour" if plan.usd is not None else ""
        peak = " (H100 bf16 dense)" if plan.peak_tflops == H100_BF16_DENSE_TFLOPS else " per GPU (--peak-tflops)"
        lines.append(f"compute: {_flops(plan.flops)} total (upper bound) = {hours:.3g} GPU-hours at "
                     f"{plan.mfu:.0%} MFU of {plan.peak_tflops:g} TFLOP/s{peak}{cost}")
    lines.append(f"verdict: {'fits' if plan.fits else 'DOES NOT FIT: see the suggestions above'}")
    return "\n".join(lines)


def _flops(f: float | None) -> str:
    return "? FLOPs" if f is None else f"{f:.3g} FLOPs"


def _cmd_plan(args) -> int:
    from rayapp.config import load_job

    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu {args.mfu:g}: a fraction in (0, 1], e.g. 0.4 for 40%")
    if args.peak_tflops <= 0:
        raise PlanError(f"--peak-tflops {args.peak_tflops:g}: must be > 0")
    if args.usd_per_gpu_hour is not None and args.usd_per_gpu_hour < 0:
        raise PlanError(f"--usd-per-gpu-hour {args.usd_per_gpu_hour:g}: must be >= 0")
    cfg = load_job(args.job, args.overrides)
    plan = estimate_plan(cfg, args.job, args.mfu, args.peak_tflops, args.usd_per_gpu_hour)
    if args.json:
        out = {"job": plan.job, "kind": plan.kind, "fits": plan.fits, "flops": plan.flops, "gpu_hours": plan.gpu_hours,
               "mfu": plan.mfu, "peak_tflops": plan.peak_tflops, "usd_per_gpu_hour": plan.usd_per_gpu_hour, "usd": plan.usd,
               "totals": plan.totals(),
               "parts": [{**asdict(p), "fits": p.fits, "memory": {**asdict(p.memory), "total": p.memory.total}}
                         for p in plan.parts]}
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="resources, memory per device and compute of a job, before submitting it")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for GPU-hours (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak TFLOP/s of one GPU (default: H100 bf16 dense, 989)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price, to print the cost")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)
