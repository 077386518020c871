"""Push the policy's new weights from the Ray Train workers into every engine of a vLLM pool.

One interface, two transports, both built on the pool (:func:`build_weight_sync`):

- :class:`SharedMemorySync` (CPU, one node; what runs here): rank 0 writes the full policy
  state dict (Hugging Face names, LoRA merged, value head left out) as safetensors into
  ``/dev/shm`` (:func:`shm_weights`, the one writer: ``LocalEngine.load_state`` uses it too) and
  every engine reloads it in place with vLLM's ``reload_weights`` (``pool.update_weights``). No
  tensor goes through Ray's object store or an RPC argument (on CPU they would arrive as lists).
- :class:`NcclBroadcastSync` (GPUs, a cluster): rank 0 joins an NCCL group with the engines'
  workers and broadcasts every parameter with vLLM's weight-transfer engine
  (``NCCLTrainerWeightTransferEngine``; CUDA IPC is the same interface with ``backend: ipc``
  when trainer and engine share a GPU). **Untested here: this machine has no GPU.** It also
  needs the engines started with ``weight_transfer_config={"backend": "nccl"}``.

``push(model)`` is called by every rank (the state dict gather is a collective under FSDP) and
returns the seconds rank 0 spent, which the RL loop reports as ``time_sync_s``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from rayapp.models.value_head import policy_of


class WeightSync(Protocol):
    def push(self, model: torch.nn.Module) -> float: ...

    def close(self) -> None: ...


def policy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The causal LM's parameters under their Hugging Face names, LoRA merged in, on CPU.

    For a peft model each adapted weight is sent as W + scale * B @ A (peft's ``get_delta_weight``),
    computed beside the model: merging in place and unmerging would not give W back exactly."""
    lm = policy_of(model)
    if hasattr(lm, "get_base_model"):
        base = lm.get_base_model()
        with torch.no_grad():
            state = {k.replace(".base_layer.", "."): v.detach().to("cpu") for k, v in base.state_dict().items() if "lora_" not in k}
            for name, module in base.named_modules():
                if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
                    continue
                key = f"{name}.weight"
                weight = state[key].clone()
                for adapter in module.active_adapters:
                    if adapter in getattr(module, "lora_A", {}):
                        weight += module.get_delta_weight(adapter).detach().to("cpu", weight.dtype)
                state[key] = weight
        return state
    return {k: v.detach().to("cpu") for k, v in lm.state_dict().items()}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy the second name of tied tensors (lm_head = embed_tokens): safetensors refuses shared
    storage, and both names must be sent: vLLM's CPU backend repacks lm_head into its own buffer
    after loading, so leaving it out leaves the engine with the old output layer."""
    seen: set[tuple] = set()
    out = {}
    for k, v in state.items():
        ptr = (v.data_ptr(), tuple(v.shape))
        out[k] = v.contiguous().clone() if ptr in seen else v.contiguous()
        seen.add(ptr)
    return out


@contextmanager
def shm_weights(state: dict[str, torch.Tensor]) -> Iterator[str]:
    """A directory in /dev/shm (the temp dir where there is none) holding ``state`` as one
    safetensors file, removed on exit: what ``reload_weights`` reads."""
    from safetensors.torch import save_file

    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="rayapp-weights-", dir=shm)
    try:
        save_file(_unshared({k: v.detach().to("cpu") for k, v in state.items()}), os.path.join(tmp, "model.safetensors"))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class SharedMemorySync:
    """CPU path: safetensors in /dev/shm, then ``reload_weights`` on every engine of the pool."""

    def __init__(self, pool, rank: int):
        self.pool = pool
        self.rank = rank
        self.last: dict[str, float] = {}

    def push(self, model: torch.nn.Module) -> float:
        if self.rank != 0:
            return 0.0
        started = time.perf_counter()
        state = policy_state_dict(model)
        gathered = time.perf_counter()
        with shm_weights(state) as weights_dir:
            written = time.perf_counter()
            self.pool.update_weights(weights_dir)
        done = time.perf_counter()
        self.last = {"gather_s": gathered - started, "write_s": written - gathered, "reload_s": done - written}
        return done - started

    def close(self) -> None:
        pass


class _EngineActorClient:
    """vLLM's VLLMWeightSyncClient protocol over the pool's LocalEngine actors (``weight_transfer``)."""

    def __init__(self, actors: list):
        self.actors = actors

    def _all(self, method: str, *args):
        import ray

        return ray.get([a.weight_transfer.remote(method, *args) for a in self.actors])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._all("update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", weight_version)


class NcclBroadcastSync:
    """GPU path: NCCL broadcast from train rank 0 to every engine worker. UNTESTED (no GPU here).

    Group layout: trainer rank 0 is NCCL rank 0, the engines' workers follow
    (``world_size = 1 + sum of engine tensor-parallel sizes``). Other train ranks only take
    part in the trainer-side gather."""

    def __init__(self, pool, rank: int, master_address: str | None = None, master_port: int = 29611):
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        self.rank = rank
        self._model_source = None
        self._source_cls = ModuleSource
        info = NCCLTrainerInitInfo(
            rank=rank,
            master_address=master_address or _node_ip(),
            master_port=master_port,
            world_size=1 + pool.engine.num_engines * pool.engine.tensor_parallel_size,
        )
        self._init = (NCCLTrainerWeightTransferEngine, info, _EngineActorClient(list(pool.actors)))
        self._engine = None

    def push(self, model: torch.nn.Module) -> float:
        started = time.perf_counter()
        if self._engine is None:
            cls, info, client = self._init
            self._engine = cls.trainer_init(info, client=client, source=self._source_cls(policy_of(model)))
        self._engine.send_weights()
        return time.perf_counter() - started if self.rank == 0 else 0.0

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def build_weight_sync(kind: str, pool, rank: int, use_gpu: bool) -> WeightSync:
    """``rl.weight_sync`` for the engines of ``pool`` (a VLLMEnginePool): 'shm', 'nccl', or 'auto'
    (nccl on GPUs, shm on CPU)."""
    if kind == "auto":
        kind = "nccl" if use_gpu else "shm"
    if kind == "nccl":
        return NcclBroadcastSync(pool, rank)
    return SharedMemorySync(pool, rank)
