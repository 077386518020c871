"""Data parallelism and precision for training workers: the process-group backend, DDP or FSDP2
wrapping with mixed precision and activation checkpointing, the global gradient norm, sharded
checkpoints, and the full (unsharded, LoRA-merged) weights for export and weight sync.

Plain torch: no ray or vllm here, and transformers / peft only through the model objects passed
in, so a machine with only torch and transformers runs it (bench/gpu_train_step.py).

Strategies (``STRATEGIES``):
    none  one process; the model is moved to the device.
    ddp   torch DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged).
    fsdp  FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer, then on the root
          (embeddings, final norm, lm_head and whatever is left): each rank keeps 1/N of every
          parameter, gradient and optimizer state (split on dim 0), and gathers one unit at a time
          for its forward and backward. Gradients are reduce-scattered and averaged over ranks,
          as DDP averages them, so the loop's loss scaling is the same for both.

Precisions (``PRECISIONS``; ``train.precision: auto`` is resolved by the config first):
    fp32        no casting: compute, gradients and optimizer state in the weights' dtype.
    bf16-mixed  float32 master weights and AdamW state, bf16 compute, float32 gradient reduction.
                FSDP2: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (the root casts
                its outputs back to fp32); none / DDP: ``torch.autocast(bf16)`` around the forward
                with float32 parameters, outputs cast to fp32. The logits therefore reach the loss in
                float32 for every strategy (computed by a bf16 matmul).

LoRA (peft) under FSDP2: frozen base weights and trainable adapters live in the same unit; FSDP2
gathers both and reduce-scatters gradients only for the adapters.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp")


def process_group_backend(device_type: str) -> str:
    """The ``init_process_group`` backend for workers training on ``device_type`` ('cuda' or 'cpu').

    On GPUs: NCCL for CUDA tensors *and* gloo for CPU tensors. The loop and the RL recipe
    all-reduce CPU tensors (token counts, metric sums); a plain "nccl" group refuses those with
    "No backend type associated with device type cpu". On CPU: plain gloo (a CPU build of torch
    has no NCCL, so even naming it in "cpu:gloo,cuda:nccl" fails there).
    """
    if device_type == "cuda":
        return "cpu:gloo,cuda:nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"no process-group backend for device type {device_type!r}: expected 'cuda' or 'cpu'")


@dataclass(frozen=True)
class Precision:
    """How a precision trains: ``compute_dtype`` for matmuls, ``reduce_dtype`` for gradient
    reduction; master weights and optimizer state keep the dtype the model was loaded in
    (float32 for bf16-mixed, checked by :func:`prepare_model`)."""

    name: str
    compute_dtype: torch.dtype | None  # None: the weights' own dtype, no casting
    reduce_dtype: torch.dtype | None

    @property
    def mixed(self) -> bool:
        return self.compute_dtype is not None


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", None, None),
    "bf16-mixed": Precision("bf16-mixed", torch.bfloat16, torch.float32),
}


def get_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        hint = (" ('auto' is resolved from resources.use_gpu by TrainConfig.resolved_precision first)"
                if name == "auto" else "")
        raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}{hint}")
    return PRECISIONS[name]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face module inside DDP and peft wrappers (FSDP2 shards in place, no wrapper).

    Under LoRA this is the transformers model with peft's LoRA layers injected: use it for
    ``.config``, ``.generation_config`` and ``save_pretrained(state_dict=full_state_dict(model))``.
    """
    m = model
    while True:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            m = m.module
        elif callable(getattr(m, "get_base_model", None)) and hasattr(m, "peft_config") and m.get_base_model() is not m:
            m = m.get_base_model()
        else:
            return m


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP2 shards one by one: modules whose class a transformers model
    inside ``model`` (the root, or wrapped by peft, a value head or a distillation projector) lists
    in ``_no_split_modules`` (LlamaDecoderLayer, Qwen2DecoderLayer, ...), else the children of the
    largest ``nn.ModuleList``."""
    hf = unwrap(model)
    names = set().union(*(getattr(m, "_no_split_modules", None) or () for m in hf.modules()))
    layers = [m for m in hf.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(hf).__name__} has no decoder layers to shard (no _no_split_modules and no "
                         "nn.ModuleList); use resources.strategy: ddp for this model")
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def prepare_model(model: nn.Module, strategy: str, device: torch.device | str, precision: str | Precision = "fp32",
                  activation_checkpointing: bool = False) -> nn.Module:
    """Place ``model`` on ``device`` and wrap it for ``strategy`` with ``precision``; returns the
    module to train (a DDP wrapper for ddp with more than one rank, the model itself with one; the
    same object, sharded in place, for fsdp).

    Every rank calls it with the same arguments, after ``init_process_group`` for ddp / fsdp and
    before the optimizer is built (FSDP2 replaces the parameters with sharded DTensors).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    prec = get_precision(precision)
    device = torch.device(device)
    world = _world()
    if strategy == "none" and world > 1:
        raise ValueError(f"strategy 'none' in a process group of {world} ranks would train {world} unsynchronised "
                         "copies; use 'ddp' or 'fsdp'")
    if strategy != "none" and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"strategy {strategy!r} needs a process group: call torch.distributed.init_process_group("
                           f"process_group_backend({device.type!r})) first (Ray Train's TorchConfig does it in workers)")
    if prec.mixed:
        low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
        if low:
            raise ValueError(f"precision {prec.name} keeps float32 master weights, but the model's parameters are "
                             f"{', '.join(low)}: load the model in float32 (model.dtype: float32); the forward still "
                             "computes in bf16")
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if strategy == "fsdp":
        return _shard(model, device, prec)
    model = model.to(device)
    if prec.mixed:
        _autocast_forward(model, device.type, prec.compute_dtype)
    if strategy == "ddp" and world > 1:
        # A single rank has nothing to all-reduce: no wrapper (as Ray Train's own prepare_model), so
        # its autograd hooks and gradient buckets cost nothing there (bench/sft_overhead.py).
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        # gradient_as_bucket_view: the all-reduce buckets are the .grad tensors (no second copy of the gradients).
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (transformers'
    gradient checkpointing, non-reentrant: works with frozen inputs under LoRA and inside FSDP2)."""
    hf = unwrap(model)
    # The transformers model itself, or the first one inside a wrapper (value head, distillation projector).
    found = [m for m in hf.modules() if getattr(m, "supports_gradient_checkpointing", False)
             and callable(getattr(m, "gradient_checkpointing_enable", None))]
    if not found:
        raise ValueError(f"{type(hf).__name__} holds no transformers model that supports gradient checkpointing; "
                         "set train.activation_checkpointing: false")
    found[0].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _shard(model: nn.Module, device: torch.device, prec: Precision) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (_world(),))
    kwargs: dict = {"mesh": mesh}
    root_kwargs: dict = {"mesh": mesh}
    if prec.mixed:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=prec.compute_dtype, reduce_dtype=prec.reduce_dtype)
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=prec.compute_dtype, reduce_dtype=prec.reduce_dtype,
                                                        output_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **root_kwargs)
    return model


def _autocast_forward(model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run ``model.forward`` under autocast and return float32 outputs (the instance attribute
    shadows the class's forward; parameters, names and state dicts are unchanged)."""
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = inner(*args, **kwargs)
        return _to_float32(out)

    model.forward = forward


def _to_float32(obj):
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, dict):  # transformers' ModelOutput is a dict: assigning keeps its attributes in step
        for k in list(obj.keys()):
            obj[k] = _to_float32(obj[k])
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float32(v) for v in obj)
    return obj


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients to a *global* L2 norm of ``max_norm`` and return that norm (before clipping).

    DDP gradients are already identical on every rank; FSDP2 gradients are DTensor shards, whose
    norm torch reduces over the ranks, so every rank returns and applies the norm of the whole
    model's gradient. Every rank must call it (a collective under FSDP2).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


# ----------------------------------------------------------------------------- checkpoints


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (the base model under LoRA) are not saved: they are reloaded from model.path.
    return StateDictOptions(ignore_frozen_params=True, **kw)


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it assumes one process when no group is initialised: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write a resumable checkpoint of the trainable weights and the optimizer with
    ``torch.distributed.checkpoint``: every rank writes its own shard file (``__<rank>_0.distcp``) and
    rank 0 the ``.metadata``. ``path`` may differ per rank (a local temporary directory): the files
    have distinct names, so copying every rank's directory into one (what Ray Train does with the
    checkpoints its workers report) gives a complete checkpoint. Every rank must call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    with _single_process_ok():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.fspath(path))


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_sharded` wrote into a model and optimizer prepared the same way
    (same strategy and world size as saved, or another: DCP reshards). Every rank must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a torch.distributed.checkpoint directory (no .metadata): "
                                "was it written by save_sharded, and were every rank's files copied into it?")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_sd, "optimizer": optim_sd}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=path)
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                            options=_state_options(strict=False))
    # strict=False only for the frozen weights the checkpoint leaves out on purpose.
    frozen = {n.removeprefix("module.") for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k.removeprefix("module.") not in frozen]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                           f"unexpected {list(result.unexpected_keys)[:5]} (a different model or adapter config?)")


# ----------------------------------------------------------------------------- full weights


def _is_lora_layer(m: nn.Module) -> bool:
    return hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)


def _check_mergeable(prefix: str, layer: nn.Module) -> None:
    name = prefix or type(layer).__name__
    if not isinstance(layer.base_layer, nn.Linear):
        raise NotImplementedError(f"LoRA on {name} wraps a {type(layer.base_layer).__name__}; only LoRA on "
                                  "nn.Linear layers is merged here (adapter.target_modules: 'all-linear' or linear names)")
    if any(getattr(layer, "use_dora", {}).get(a, False) for a in layer.active_adapters):
        raise NotImplementedError(f"LoRA on {name} uses DoRA, which this merge does not implement")
    if any(getattr(layer, "lora_bias", {}).get(a, False) for a in layer.active_adapters):
        raise NotImplementedError(f"LoRA on {name} has lora_bias, which this merge does not implement")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from the ranks for a DTensor shard (a collective), else itself."""
    t = t.detach()
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _iter_full(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """(name, full tensor, name of the earlier entry it is tied to or None) in state-dict order;
    names and values as peft's ``merge_and_unload()`` followed by ``state_dict()`` gives them: LoRA
    deltas merged into their base weights, ``base_layer`` dropped from names, adapter tensors left
    out. Every rank must iterate to the end: gathers are collectives, taken in the same order."""
    hf = unwrap(model)
    lora = {name: m for name, m in hf.named_modules() if _is_lora_layer(m)}
    for name, m in lora.items():
        _check_mergeable(name, m)
    first_name: dict[int, str] = {}
    for key, value in hf.state_dict(keep_vars=True).items():
        if ".original_module." in key:
            continue  # peft's frozen copy of a module it trains whole (modules_to_save): replaced below
        if ".modules_to_save." in key:  # <module>.modules_to_save.<adapter>.<tensor>, e.g. a reward model's score head
            prefix, _, rest = key.partition(".modules_to_save.")
            adapter, _, tail = rest.partition(".")
            if adapter in getattr(hf.get_submodule(prefix), "active_adapters", [adapter]):
                yield f"{prefix}.{tail}", _full(value), None
            continue
        prefix, sep, _ = key.partition(".lora_")
        if sep and prefix in lora:
            continue  # adapter tensors (<layer>.lora_A.<adapter>.weight): merged into the base weight below
        prefix, sep, rest = key.partition(".base_layer.")
        if sep and prefix in lora:
            layer, out_name = lora[prefix], f"{prefix}.{rest}"
            tensor = _full(value)
            if rest == "weight":
                tensor = tensor.clone()
                for a in layer.active_adapters:
                    if a not in layer.lora_A:
                        continue
                    delta = _full(layer.lora_B[a].weight) @ _full(layer.lora_A[a].weight)
                    if getattr(layer, "fan_in_fan_out", False):
                        delta = delta.T
                    tensor += (delta * layer.scaling[a]).to(tensor.dtype)
            yield out_name, tensor, None
            continue
        if id(value) in first_name:  # the same Parameter under a second name (tied lm_head)
            yield key, None, first_name[id(value)]
            continue
        first_name[id(value)] = key
        yield key, _full(value), None


def iter_full_params(model: nn.Module, bucket_bytes: int = 256 * 1024**2) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Full weights in buckets of at most ``bucket_bytes`` (a tensor larger than that is a bucket of
    its own), on the model's device, for streaming to an inference engine: no rank holds more than
    one bucket of gathered weights at a time. Names and values as :func:`full_state_dict`, except
    that a weight tied to an earlier one (lm_head to the embeddings) is sent once, under the first
    name (vLLM and transformers re-tie it). Every rank must consume the whole iterator, in step.
    Under none / ddp nothing is gathered and the tensors are the live parameters (LoRA-merged ones
    excepted): consume a bucket before the next optimizer step.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t, tied_to in _iter_full(model):
        if tied_to is not None:
            continue
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def full_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The LoRA tensors of a peft model (inside a DDP wrapper or sharded by FSDP2 in place), whole,
    on CPU on rank 0 (``None`` on other ranks), under the names ``PeftModel.state_dict()`` gives
    them: what ``peft_model.save_pretrained(dir, state_dict=...)`` takes to write adapter/. Every
    rank must call it (the gathers are collectives)."""
    m = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not hasattr(m, "peft_config"):
        raise ValueError(f"{type(m).__name__} is not a peft model: there is no adapter to export")
    out: dict[str, torch.Tensor] | None = {} if _rank() == 0 else None
    for key, value in m.state_dict(keep_vars=True).items():
        if "lora_" not in key:
            continue
        t = _full(value)
        if out is not None:
            out[key] = t.to("cpu", copy=True)
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full, unsharded state dict on CPU on rank 0 (``None`` on other ranks), LoRA merged: the
    names and values of peft's ``merge_and_unload().state_dict()`` (tied weights under both names).
    ``unwrap(model).save_pretrained(dir, state_dict=...)`` on rank 0 writes a directory transformers
    and vLLM load (it pops the tensors out of the dict it is given). When the trained root wraps the
    language model (a value head, a distillation projector), pass that submodule: names are relative
    to the module passed. Gathers one tensor at a time; every rank must call it."""
    out: dict[str, torch.Tensor] | None = {} if _rank() == 0 else None
    for name, t, tied_to in _iter_full(model):
        if out is not None:
            # copy=True: a snapshot, never a view of a live parameter (none / ddp on CPU).
            out[name] = out[tied_to] if tied_to is not None else t.to("cpu", copy=True)
    return out
