"""Push the policy's new weights from the Ray Train workers into every engine of a vLLM pool.

One interface, :class:`WeightSync` (``push(model) -> seconds``, ``last``: what the push measured,
``close()``), built on the pool by :func:`build_weight_sync`; two transports, both crossing nodes.
Both read the trainer's weights through ``rayapp.training.parallel.iter_full_params``: buckets of
full tensors (each gathered from the FSDP2 shards in turn, so no rank holds more than one bucket of
gathered weights), LoRA merged in (the names and values of peft's ``merge_and_unload()``), value
head left out (``policy_of``). Every rank calls ``push`` (the gathers are collectives); rank 0 sends.

- ``shm`` — :class:`ObjectStoreSync` (CPU engines, any number of nodes; what runs here). Rank 0
  serialises each bucket as one safetensors blob and puts it in Ray's object store; on every node
  that holds engines, one engine actor receives it (Ray moves the object to that node) and writes
  it into that node's ``/dev/shm``. With every bucket there, each engine reloads its weights in
  place from its own node's copy (vLLM ``reload_weights``) and the files are removed. At most
  ``IN_FLIGHT`` buckets are in the object store at once, so no process holds the model twice, and
  nothing assumes a filesystem the trainer and the engines share. Tensors never travel as RPC
  arguments to another process (through ``collective_rpc`` on CPU they arrive as lists). Where every
  engine runs its engine core in its actor's own process (CPU engines, ``teachers.pool.engine_env``),
  :func:`send_buckets_in_memory` skips the files and safetensors: each bucket goes in as numpy
  arrays and each engine loads them from its node's object store, without a copy, in one call.
- ``nccl`` — :class:`NcclSync` (GPU engines): vLLM's weight-transfer engine
  (``NCCLTrainerWeightTransferEngine``): trainer rank 0 is NCCL rank 0, each engine's workers join
  the group at their own rank offset, and the parameters are broadcast in packed buffers straight
  from the bucketed gather (:class:`FullParamsSource`). The engines must be started with
  ``weight_transfer_config={"backend": "nccl"}`` (``VLLMEnginePool(weight_transfer="nccl")``).
  **Run only on CPU here**: the name / dtype / shape / bucketing layer is tested against vLLM's
  own checks without NCCL; the broadcast itself needs GPUs (``bench/`` has no GPU script for it,
  the GPU machine lent to this project has neither ray nor vllm).

Each push leaves in ``last`` (the RL loop writes them to metrics.jsonl as ``sync_<key>``):
``gather_s`` (rank 0 waiting for the next bucket: FSDP gathers and the LoRA merge), ``transfer_s``
(serialising and moving the bytes to the engines' nodes, or the NCCL broadcast), ``load_s`` (the
engines loading them), ``bytes`` (one copy of the weights as sent), ``buckets``, ``nodes``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

from rayapp.errors import UserError
from rayapp.models.value_head import policy_of

TRANSPORTS = ("shm", "nccl")
DEFAULT_BUCKET_BYTES = 256 * 1024**2
IN_FLIGHT = 2  # buckets in Ray's object store at once (the next one is serialised while these move)
WIRE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class WeightSyncError(UserError, RuntimeError):
    """The weights could not be pushed into the engines; the message says which and what to change."""


class WeightSync(Protocol):
    last: dict[str, float]

    def push(self, model: torch.nn.Module) -> float: ...

    def close(self) -> None: ...


def resolve_transport(kind: str, use_gpu: bool) -> str:
    """``rl.weight_sync`` ('auto', 'shm', 'nccl') -> the transport: 'auto' is nccl on GPU engines, else shm."""
    if kind == "auto":
        return "nccl" if use_gpu else "shm"
    if kind not in TRANSPORTS:
        raise WeightSyncError(f"rl.weight_sync: {kind!r} is not one of auto, {', '.join(TRANSPORTS)}")
    return kind


def wire_dtype(engine_dtype: str) -> torch.dtype | None:
    """The dtype floating-point weights are sent in: the engine's own (half the bytes of float32
    masters for a bf16 engine), or None for ``auto`` (as the trainer holds them)."""
    return WIRE_DTYPES.get(engine_dtype)


# -- what is sent: names, shapes, buckets --------------------------------------------------------

def _hf_entries(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of the language model's state dict, peft's ``base_layer`` dropped
    from names and adapter tensors left out: the names ``merge_and_unload()`` gives."""
    from rayapp.training.parallel import unwrap

    for key, value in unwrap(policy_of(model)).state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        yield key.replace(".base_layer.", "."), value


def tied_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """{first name: later names} of tensors shared under several names (lm_head tied to the
    embeddings). ``iter_full_params`` sends such a tensor once; vLLM's CPU backend repacks lm_head
    into its own buffer after a reload, so the CPU transport writes it under every name."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, value in _hf_entries(model):
        if id(value) in first:
            aliases.setdefault(first[id(value)], []).append(name)
        else:
            first[id(value)] = name
    return aliases


def full_param_meta(model: torch.nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, wire dtype, full shape) of every tensor ``iter_full_params(policy_of(model))`` yields,
    in its order, read without gathering anything (a DTensor's ``shape`` is the global one): what
    the NCCL receivers size their buffers from. vLLM checks it against the stream as it sends
    (``_checked_iter``), so a disagreement is an error naming the tensor, not a hang."""
    seen: set[int] = set()
    meta = []
    for name, value in _hf_entries(model):
        if id(value) in seen:
            continue
        seen.add(id(value))
        meta.append((name, dtype if dtype is not None and value.is_floating_point() else value.dtype, tuple(value.shape)))
    return meta


def _wire(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(callable(getattr(p, "full_tensor", None)) for p in model.parameters())


def full_buckets(model: torch.nn.Module, bucket_bytes: int, dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``iter_full_params`` over the policy inside ``model`` (DDP, value head and peft unwrapped),
    floating tensors cast to ``dtype``. Every rank of a sharded model must consume it in step."""
    from rayapp.training.parallel import iter_full_params

    for bucket in iter_full_params(policy_of(model), bucket_bytes):
        yield [(name, _wire(t, dtype)) for name, t in bucket]


def serialize_bucket(bucket: list[tuple[str, torch.Tensor]], aliases: dict[str, list[str]] | None = None):
    """One bucket as the bytes of a safetensors file (a uint8 numpy array: Ray's object store hands
    it to the reader without a copy). Tied names get their own copy (safetensors refuses shared storage)."""
    import numpy as np
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in bucket:
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        t = t.contiguous().clone() if ptr in storages else t.contiguous()
        storages.add(ptr)
        tensors[name] = t
        for alias in (aliases or {}).get(name, ()):
            tensors[alias] = t.clone()
    return np.frombuffer(save(tensors), dtype=np.uint8)


def state_buckets(state: dict[str, torch.Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """A state dict in buckets of at most ``bucket_bytes`` (a larger tensor is a bucket of its own)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


# -- the engine node's side --------------------------------------------------------------------

def staging_dir(version: str) -> str:
    """Where an engine node keeps the weights of push ``version`` while its engines reload them:
    ``/dev/shm`` (memory, never a disk), or the temporary directory where there is none."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(shm, f"rayapp-weights-{version}")


def write_staged(version: str, name: str, blob) -> int:
    """Write one bucket (bytes of a safetensors file) into this node's staging directory."""
    d = staging_dir(version)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(blob))
    os.replace(tmp, os.path.join(d, name))  # reload_weights reads *.safetensors: never a partial file
    return len(blob)


def drop_staged(version: str) -> None:
    shutil.rmtree(staging_dir(version), ignore_errors=True)


# -- CPU transport -----------------------------------------------------------------------------

def send_buckets(pool, buckets: Iterable[list[tuple[str, torch.Tensor]]], aliases: dict[str, list[str]] | None = None,
                 in_memory: bool | None = None) -> dict:
    """Move ``buckets`` to every node of ``pool`` that holds engines, through Ray's object store,
    and reload every engine from its node's copy. Returns what it measured (see the module doc).
    ``in_memory``: load without staging files (:func:`send_buckets_in_memory`); None: where every
    engine's core runs in its actor's process."""
    import ray

    if in_memory is None:
        in_memory = loads_in_memory(pool)
    if in_memory:
        return send_buckets_in_memory(pool, buckets, aliases)
    writers = pool.node_writers()
    version = uuid.uuid4().hex[:12]
    m = {"gather_s": 0.0, "bytes": 0.0, "buckets": 0.0}
    inflight: list[list] = []
    started = time.perf_counter()
    try:
        for count, ref in enumerate(put_buckets(buckets, aliases, m)):
            inflight.append([w.stage_weights.remote(version, f"bucket-{count:05d}.safetensors", ref) for w in writers])
            del ref  # the object lives until every writer has it
            while len(inflight) > IN_FLIGHT:
                ray.get(inflight.pop(0))
        for refs in inflight:
            ray.get(refs)
        transfer = time.perf_counter() - started - m["gather_s"]
        t2 = time.perf_counter()
        ray.get([a.reload_staged.remote(version) for a in pool.actors])
        load = time.perf_counter() - t2
    finally:
        ray.get([w.drop_staged.remote(version) for w in writers])
    return m | {"transfer_s": transfer, "load_s": load, "nodes": float(len(writers))}


def send_buckets_in_memory(pool, buckets: Iterable[list[tuple[str, torch.Tensor]]], aliases: dict[str, list[str]] | None = None) -> dict:
    """``send_buckets`` for engines whose engine core runs in the engine actor's own process (CPU
    engines): every bucket goes into Ray's object store as arrays (:func:`pack_bucket`: one copy in,
    none out) and each engine loads them all from its node's copy in one call
    (``load_weight_arrays``), in memory: no staging files, no second call to reload, none to clean
    up. The object store holds one copy of the weights per engine node until the engines have
    loaded them, as the staging directories would."""
    import ray

    m = {"gather_s": 0.0, "bytes": 0.0, "buckets": 0.0}
    started = time.perf_counter()
    refs = list(put_buckets(buckets, aliases, m, pack_bucket))
    transfer = time.perf_counter() - started - m["gather_s"]
    t2 = time.perf_counter()
    ray.get([a.load_weight_arrays.remote(*refs) for a in pool.actors])
    load = time.perf_counter() - t2
    return m | {"transfer_s": transfer, "load_s": load, "nodes": float(len(pool.node_writers()))}


def put_buckets(buckets: Iterable[list[tuple[str, torch.Tensor]]], aliases: dict[str, list[str]] | None, m: dict,
                serialize=serialize_bucket) -> Iterator:
    """Each bucket serialised (``serialize``: a safetensors blob unless given) and put in
    Ray's object store, as it comes: yields the object refs; adds to ``m`` the time spent waiting
    for the buckets (``gather_s``), their ``bytes`` and their count (``buckets``). Raises when
    ``buckets`` yields none."""
    import ray

    it = iter(buckets)
    while True:
        t0 = time.perf_counter()
        bucket = next(it, None)
        m["gather_s"] += time.perf_counter() - t0
        if bucket is None:
            break
        m["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)  # the tensors' own bytes, either form
        blob = serialize(bucket, aliases)
        m["buckets"] += 1
        ref = ray.put(blob)
        del blob, bucket
        yield ref
    if not m["buckets"]:
        raise WeightSyncError("the policy yielded no weights to send to the engines")


def pack_bucket(bucket: list[tuple[str, torch.Tensor]], aliases: dict[str, list[str]] | None = None) -> list[tuple[tuple[str, ...], str, np.ndarray]]:
    """One bucket as ``(names, dtype, array)`` triples for an in-memory load: each tensor's bytes as
    a numpy array (bfloat16 viewed as int16, which numpy lacks), under its own name and its tied
    ones. Ray puts numpy arrays out of band, so ``ray.put`` copies each tensor once into the object
    store and the engine reads it there without a copy (:func:`unpack_buckets`); a safetensors blob
    cost two more copies on each side (5.7 ms to serialise 4 MB here against 0.3 ms)."""
    packed = []
    for name, t in bucket:
        t = t.detach().to("cpu").contiguous()
        array = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        packed.append(((name, *(aliases or {}).get(name, ())), str(t.dtype).removeprefix("torch."), array))
    return packed


def unpack_buckets(packed: Iterable[list[tuple[tuple[str, ...], str, np.ndarray]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of buckets made by :func:`pack_bucket`, each tensor a view of its array
    (read-only in the object store: the engine's weight loaders copy out of it, never into it)."""
    import warnings

    for bucket in packed:
        for names, dtype, array in bucket:
            with warnings.catch_warnings():  # "the given NumPy array is not writable": it is only read
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(array)
            t = t.view(torch.bfloat16) if dtype == "bfloat16" else t
            for name in names:
                yield name, t


def loads_in_memory(pool) -> bool:
    """Every engine of ``pool`` runs its engine core in its actor's process (new weights can be
    handed over in memory)."""
    return all(info.get("core_in_process") for info in getattr(pool, "infos", None) or [{}])


class ObjectStoreSync:
    """``shm``: buckets through Ray's object store into each engine node's /dev/shm, then reload."""

    transport = "shm"

    def __init__(self, pool, rank: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None):
        self.pool, self.rank, self.bucket_bytes, self.dtype = pool, rank, bucket_bytes, dtype
        self.last: dict[str, float] = {}

    def push(self, model: torch.nn.Module) -> float:
        if self.rank != 0:
            if _is_sharded(model):  # the gathers are collectives: walk them in step with rank 0
                for _ in full_buckets(model, self.bucket_bytes, self.dtype):
                    pass
            return 0.0
        started = time.perf_counter()
        self.last = send_buckets(self.pool, full_buckets(model, self.bucket_bytes, self.dtype), tied_aliases(model))
        return time.perf_counter() - started

    def close(self) -> None:
        pass


# -- GPU transport -----------------------------------------------------------------------------

def full_params_source(model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None):
    """A vLLM ``WeightSource`` over :func:`full_buckets`: ``metadata()`` from :func:`full_param_meta`
    (no gather), iteration from the bucketed gather. Records ``gather_s``, ``bytes`` and
    (bytes, tensors) of each bucket of its last pass."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class FullParamsSource(WeightSource):
        def __init__(self):
            self._meta = [ParamMeta(n, d, s) for n, d, s in full_param_meta(model, dtype)]
            self.reset()

        def reset(self) -> None:
            self.gather_s, self.bytes, self.bucket_sizes = 0.0, 0, []

        def metadata(self):
            return self._meta

        def __iter__(self):
            self.reset()
            it = full_buckets(model, bucket_bytes, dtype)
            while True:
                t0 = time.perf_counter()
                bucket = next(it, None)
                self.gather_s += time.perf_counter() - t0
                if bucket is None:
                    return
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                self.bucket_sizes.append((size, len(bucket)))
                self.bytes += size
                yield from bucket

    return FullParamsSource()


def engine_init_infos(init_info: dict, tp_sizes: list[int]) -> list[dict]:
    """vLLM's worker init info for each engine: the trainer is NCCL rank 0 and vLLM gives every
    engine ``rank_offset`` 1; separate engines (not one data-parallel engine) would then collide,
    so engine ``i`` starts after the workers of engines ``0..i-1``."""
    out, offset = [], 1
    for tp in tp_sizes:
        out.append({**init_info, "rank_offset": offset})
        offset += tp
    if offset != init_info["world_size"]:
        raise WeightSyncError(f"NCCL group of world_size {init_info['world_size']} but 1 trainer + {offset - 1} engine workers")
    return out


class EngineActorClient:
    """vLLM's ``VLLMWeightSyncClient`` over the pool's LocalEngine actors (``weight_transfer``),
    timing the engines' start / finish of each update (their load time)."""

    def __init__(self, actors: list, tp_size: int):
        self.actors, self.tp_size = actors, tp_size
        self.load_s = 0.0

    def _all(self, step: str, *args):
        import ray

        return ray.get([a.weight_transfer.remote(step, *args) for a in self.actors])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        import ray

        infos = engine_init_infos(init_info, [self.tp_size] * len(self.actors))
        ray.get([a.weight_transfer.remote("init_weight_transfer_engine", {"init_info": i}) for a, i in zip(self.actors, infos, strict=True)])

    def start_weight_update(self) -> None:
        t0 = time.perf_counter()
        self._all("start_weight_update")
        self.load_s += time.perf_counter() - t0

    def update_weights(self, update_info) -> None:
        self._all("update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        t0 = time.perf_counter()
        self._all("finish_weight_update", weight_version)
        self.load_s += time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class NcclSync:
    """``nccl``: vLLM's NCCL weight-transfer engine fed by the bucketed gather. Needs GPUs: the
    group is opened on the first push (rank 0's node address, a free port there)."""

    transport = "nccl"

    def __init__(self, pool, rank: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None):
        if not pool.engine.use_gpu or getattr(pool, "weight_transfer", None) != "nccl":
            raise WeightSyncError("rl.weight_sync: nccl needs GPU engines started for it: set engine.use_gpu: true "
                                  "(the rlhf recipe then starts them with weight_transfer_config nccl), or use rl.weight_sync: shm")
        self.pool, self.rank, self.bucket_bytes, self.dtype = pool, rank, bucket_bytes, dtype
        self.last: dict[str, float] = {}
        self._engine = self._source = self._client = None

    def _start(self, model: torch.nn.Module) -> None:
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        tp = self.pool.engine.tensor_parallel_size
        info = NCCLTrainerInitInfo(rank=self.rank, master_address=ray.util.get_node_ip_address(), master_port=_free_port(),
                                   world_size=1 + len(self.pool.actors) * tp)
        self._source = full_params_source(model, self.bucket_bytes, self.dtype)
        self._client = EngineActorClient(list(self.pool.actors), tp)
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self._client, source=self._source)

    def push(self, model: torch.nn.Module) -> float:
        if self._engine is None:
            self._start(model)
        self._client.load_s = 0.0
        started = time.perf_counter()
        self._engine.send_weights()
        total = time.perf_counter() - started
        if self.rank != 0:
            return 0.0
        s = self._source
        self.last = {"gather_s": s.gather_s, "load_s": self._client.load_s, "transfer_s": max(0.0, total - s.gather_s - self._client.load_s),
                     "bytes": float(s.bytes), "buckets": float(len(s.bucket_sizes)), "nodes": float(len(self.pool.node_writers()))}
        return total

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


SYNCS = {"shm": ObjectStoreSync, "nccl": NcclSync}


def build_weight_sync(kind: str, pool, rank: int, use_gpu: bool, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightSync:
    """The sync for ``rl.weight_sync`` (``kind``) into the engines of ``pool`` (a VLLMEnginePool);
    ``use_gpu``: whether the engines run on GPUs ('auto' picks nccl there)."""
    return SYNCS[resolve_transport(kind, use_gpu)](pool, rank, bucket_bytes, wire_dtype(pool.engine.dtype))
