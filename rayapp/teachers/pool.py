"""A pool of Ray actors, each holding one vLLM engine: generate, score, update_weights, sleep/wake.

:class:`LocalEngine` is the engine wrapper itself (plain Python, used inside an actor or a
Ray Data stage); :class:`VLLMEnginePool` starts ``engine.num_engines`` actors running it and
spreads requests over them. Prompts are tokenized here rather than in vLLM so that an empty
prompt or one longer than the engine's context comes back as a :class:`Completion` with
``error`` set instead of failing the whole request (vLLM rejects the batch).

On CPU, vLLM's sleep/wake only pauses the scheduler (there is no device memory to free);
on GPU ``sleep()`` offloads weights and drops the KV cache (sleep level 1).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from rayapp.config.base import EngineConfig, SamplingConfig
from rayapp.errors import UserError
from rayapp.teachers import EMPTY_PROMPT, PROMPT_TOO_LONG, Completion

log = logging.getLogger(__name__)
WEIGHT_TRANSFER_STEPS = ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update")


class EngineInputError(UserError, ValueError):
    """Sequences handed to score() that the engine cannot take."""


def engine_env(engine: EngineConfig, on_engine_node: bool = False) -> dict[str, str]:
    """Environment variables an engine process needs (vLLM reads them at import).

    ``on_engine_node``: called in the engine's own process, where ``cpu_threads_bind: all`` can be
    resolved to this machine's cores (the driver may run on a machine with other cores).
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(engine.kv_cache_gib))), "TOKENIZERS_PARALLELISM": "false"}
    # vLLM's start-up warnings on the CPU build (no Triton, no tcmalloc, eager mode: a dozen lines an
    # engine) stay off the console unless `rayapp -v`; its errors still show.
    quiet = "WARNING" if logging.getLogger("rayapp").isEnabledFor(logging.DEBUG) else "ERROR"
    env.setdefault("VLLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", quiet))
    if not engine.use_gpu:
        # On CPU the engine core runs in the engine's own process, not in a second one: that process
        # would share the same cores (no overlap to gain) and costs a second vLLM import, ~14 s of
        # each start on 2 cores (LocalEngine start 46 s -> 17 s). On GPU the separate process overlaps
        # scheduling with the device's work and stays on. An environment's own setting wins.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    bind = engine.cpu_threads_bind
    if not engine.use_gpu and bind != "auto" and (bind != "all" or on_engine_node):
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0)))) if bind == "all" else bind
    return env


def llm_kwargs(model_path: str, engine: EngineConfig, weight_transfer: str | None = None) -> dict[str, Any]:
    """vLLM ``LLM(...)`` arguments; ``weight_transfer``: the backend of vLLM's weight-transfer
    engine to start with (``"nccl"`` for the GPU weight sync), or None."""
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        dtype=engine.dtype,
        enforce_eager=engine.enforce_eager,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        seed=engine.seed,
        tensor_parallel_size=engine.tensor_parallel_size,
    )
    if engine.logprobs_mode == "processed":
        kwargs["logprobs_mode"] = "processed_logprobs"
    kwargs["worker_extension_cls"] = "rayapp.teachers.engine_reload.WeightReload"
    if engine.use_gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        if engine.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
    else:
        kwargs["gpu_memory_utilization"] = 0.3  # host memory on CPU; the KV cache size comes from engine_env
    if weight_transfer:
        kwargs["weight_transfer_config"] = {"backend": weight_transfer}
    return kwargs


def sampling_params(sampling: SamplingConfig | dict, cpu: bool = False, **overrides):
    """SamplingConfig -> vllm.SamplingParams.

    On the CPU build a per-request seed kills the engine ("CPU Generator does not use offset",
    vLLM 0.32; seen with top-p / top-k and with plain temperature sampling of long prompts): there
    the request seed is dropped and sampling is reproducible only through engine.seed."""
    from vllm import SamplingParams

    s = sampling.model_dump() if isinstance(sampling, SamplingConfig) else dict(sampling)
    s.update(overrides)
    if cpu and s["seed"] is not None:
        log.warning("sampling.seed ignored on CPU (vLLM CPU limitation); engine.seed still applies")
        s["seed"] = None
    return SamplingParams(
        n=s["n"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        top_k=s["top_k"] if s["top_k"] and s["top_k"] > 0 else -1,
        max_tokens=s["max_tokens"],
        stop=s["stop"] or None,
        logprobs=s["logprobs"],
        seed=s["seed"],
    )


class LocalEngine:
    """One vLLM engine in this process. Methods take and return plain Python (Ray-friendly)."""

    def __init__(self, model_path: str, engine: dict | EngineConfig, weight_transfer: str | None = None):
        engine = engine if isinstance(engine, EngineConfig) else EngineConfig.model_validate(engine)
        for key, value in engine_env(engine, on_engine_node=True).items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        started = time.perf_counter()
        self.engine = engine
        self.model_path = str(model_path)
        self.llm = LLM(**llm_kwargs(model_path, engine, weight_transfer))
        self.tokenizer = self.llm.get_tokenizer()
        # The engine core (and its worker) in this process: new weights can be handed over in memory.
        self.core_in_process = not engine.use_gpu and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.start_seconds = time.perf_counter() - started
        # generate() from several threads at once (a batch stage's concurrent calls): every call's
        # requests join the same running engine batch (see _run_shared).
        self._engine_lock = threading.Lock()      # the engine's add/step: one thread at a time
        self._done = threading.Condition()        # guards _finished and _driving
        self._finished: dict[str, Any] = {}
        self._driving = False
        self._request_ids = itertools.count()

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, list):  # chat messages
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def _check(self, prompt: str | list[dict], ids: list[int]) -> tuple[str, str] | None:
        """(finish_reason, message) for a prompt that must not go to the engine, else None."""
        empty = (not prompt) if isinstance(prompt, list) else not str(prompt).strip()
        if empty:
            return EMPTY_PROMPT, "the prompt is empty; give non-empty input_text or messages"
        if len(ids) >= self.engine.max_model_len:
            return PROMPT_TOO_LONG, (
                f"the prompt has {len(ids)} tokens but the engine's context is engine.max_model_len="
                f"{self.engine.max_model_len}; shorten the prompt or raise engine.max_model_len"
            )
        return None

    def generate(self, prompts: list, sampling: dict, indices: list[int] | None = None) -> list[dict]:
        """Generate for ``prompts`` (texts or message lists); one dict per completion (see Completion)."""
        from vllm.inputs import TokensPrompt

        indices = list(range(len(prompts))) if indices is None else indices
        params = sampling_params(sampling, cpu=not self.engine.use_gpu)
        results: list[dict] = []
        todo, todo_idx, todo_len = [], [], []
        for prompt, index in zip(prompts, indices, strict=True):
            try:
                ids = self.encode(prompt) if prompt else []
                problem = self._check(prompt, ids)
            except Exception as e:  # not text, or a chat template that refuses the messages
                ids, problem = [], (EMPTY_PROMPT, f"the prompt could not be rendered ({type(e).__name__}: {e})")
            if problem:
                reason, message = problem
                results.append(dict(text="", token_ids=[], finish_reason=reason, prompt_index=index, prompt_tokens=len(ids), error=message))
                continue
            todo.append(TokensPrompt(prompt_token_ids=ids))
            todo_idx.append(index)
            todo_len.append(len(ids))
        if todo:
            outputs = self._run_shared(todo, params)
            for out, index, n_prompt in zip(outputs, todo_idx, todo_len, strict=True):
                for k, c in enumerate(out.outputs):
                    logprobs = None
                    if c.logprobs is not None:
                        logprobs = [{int(t): float(lp.logprob) for t, lp in d.items()} for d in c.logprobs]
                    results.append(
                        dict(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason, logprobs=logprobs,
                             prompt_index=index, sample_index=k, prompt_tokens=n_prompt)
                    )
        return results

    def _run_shared(self, prompts: list, params) -> list:
        """``llm.generate(prompts, params)``, safe to call from several threads at once: each call
        enqueues its requests, and one caller at a time (the driver) steps the engine for all of
        them, so the requests of concurrent calls are batched together (continuous batching across
        calls: a call's short completions are replaced by another call's prompts instead of the
        engine idling until the call's longest completion ends). A caller returns as soon as its
        own requests are finished, handing the driving to a caller still waiting."""
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it ends (as LLM.generate)
        with self._engine_lock:
            ids = [f"rayapp-{next(self._request_ids)}" for _ in prompts]
            for request_id, prompt in zip(ids, prompts, strict=True):
                self.llm.llm_engine.add_request(request_id, prompt, params)
        with self._done:
            while not all(r in self._finished for r in ids):
                if not self._driving:
                    self._driving = True
                    break
                self._done.wait()
            else:
                return [self._finished.pop(r) for r in ids]
        try:
            while True:
                with self._engine_lock:
                    outputs = self.llm.llm_engine.step()
                with self._done:
                    self._finished.update((o.request_id, o) for o in outputs if o.finished)
                    self._done.notify_all()
                    if all(r in self._finished for r in ids):
                        return [self._finished.pop(r) for r in ids]
        finally:
            with self._done:
                self._driving = False
                self._done.notify_all()

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[list[Any]]:
        """Per sequence, for each token after the first: its logprob given the prefix (top_k=0) or
        a dict {token: logprob} holding the top_k tokens plus the given one (top_k>0)."""
        from vllm.inputs import TokensPrompt

        for i, seq in enumerate(sequences):
            if len(seq) < 2:
                raise EngineInputError(f"score(): sequence {i} has {len(seq)} tokens; it needs at least 2 (the first has no logprob)")
            if len(seq) >= self.engine.max_model_len:
                raise EngineInputError(
                    f"score(): sequence {i} has {len(seq)} tokens but engine.max_model_len is {self.engine.max_model_len}; "
                    "raise engine.max_model_len or shorten the sequences"
                )
        params = sampling_params(SamplingConfig(max_tokens=1, temperature=0.0))
        params.prompt_logprobs = top_k
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        scored = []
        for seq, out in zip(sequences, outputs, strict=True):
            per_pos = out.prompt_logprobs[1:]
            if top_k:
                scored.append([{int(t): float(lp.logprob) for t, lp in d.items()} for d in per_pos])
            else:
                scored.append([float(d[tok].logprob) for tok, d in zip(seq[1:], per_pos, strict=True)])
        return scored

    # -- weights and memory --------------------------------------------------------------------
    def reload_weights(self, weights_dir: str) -> float:
        """Load every *.safetensors in ``weights_dir`` (Hugging Face names) into the running engine."""
        started = time.perf_counter()
        if self.engine.use_gpu:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_dir)})
        else:  # vLLM's in-place reload leaves the CPU build's packed projections unchanged
            self.llm.collective_rpc("rayapp_reload_weights", args=(str(weights_dir),))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def load_weight_arrays(self, *buckets) -> float:
        """Load ``buckets`` (each a list of (names, dtype, array) as weight_sync.pack_bucket makes
        them; passed as object refs, Ray resolves them from this node's object store without a
        copy) straight into the engine: no staging files. Only for an engine whose core runs in
        this process (``core_in_process``)."""
        from rayapp.teachers.weight_sync import unpack_buckets

        if not self.core_in_process:
            raise RuntimeError("load_weight_arrays needs the engine core in this process (a CPU engine with "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0); stage the weights and reload_staged instead")
        started = time.perf_counter()
        self.llm.collective_rpc("rayapp_load_weights", args=(unpack_buckets(buckets),))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - started

    def stage_weights(self, version: str, name: str, blob) -> int:
        """Write one bucket of push ``version`` (the bytes of a safetensors file) into this node's
        staging directory (weight_sync.staging_dir: /dev/shm); returns the bytes written."""
        from rayapp.teachers.weight_sync import write_staged

        return write_staged(version, name, blob)

    def reload_staged(self, version: str) -> float:
        """Reload every weight from this node's copy of push ``version``."""
        from rayapp.teachers.weight_sync import staging_dir

        return self.reload_weights(staging_dir(version))

    def drop_staged(self, version: str) -> None:
        from rayapp.teachers.weight_sync import drop_staged

        drop_staged(version)

    def weight_transfer(self, step: str, *args):
        """One step of vLLM's weight-transfer protocol on this engine (GPU weight sync over NCCL:
        init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update)."""
        if step not in WEIGHT_TRANSFER_STEPS:
            raise ValueError(f"weight_transfer: unknown step {step!r}; expected one of {WEIGHT_TRANSFER_STEPS}")
        return getattr(self.llm, step)(*args)

    def sleep(self) -> None:
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()

    def info(self) -> dict:
        """pid, start time, model, and the Ray node this engine runs on (None outside Ray)."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"pid": os.getpid(), "start_seconds": self.start_seconds, "model": self.model_path, "node_id": node,
                "core_in_process": self.core_in_process}


def check_engine_resources(ray, engine: EngineConfig, name: str) -> None:
    """Fail fast when no node can hold an engine that asks for the custom resources
    ``engine.resources`` (Ray would wait for them forever): a resource no node has, a node that has
    it but not the engine's CPUs/GPU beside it, or fewer such nodes than ``engine.num_engines``
    need. Counts what an autoscaler may add (:func:`rayapp.runtime.node_capacities`), as the
    trainers' check does. Engines without custom resources are checked by ``check_resources``'s
    totals alone (they go wherever CPUs are free)."""
    if not engine.resources:
        return
    from rayapp.runtime import ResourceError, check_resources

    # What one engine asks Ray for, all on one node (a tensor-parallel GPU engine: its whole
    # STRICT_PACK placement group, see tensor_parallel_bundles).
    bundle: dict[str, float] = {"CPU": float(engine.cpus_per_engine), **{k: float(v) for k, v in engine.resources.items()}}
    if engine.use_gpu and engine.tensor_parallel_size == 1:
        bundle["GPU"] = 1.0
    elif engine.use_gpu:
        bundle = {}
        for part in tensor_parallel_bundles(engine):
            for key, value in part.items():
                bundle[key] = bundle.get(key, 0.0) + value
    fields = {"CPU": "engine.cpus_per_engine", "GPU": "engine.use_gpu", **{k: f"engine.resources.{k}" for k in engine.resources}}
    try:
        check_resources(what=f"the {name} engine pool (engine.resources {dict(engine.resources)}, engine.num_engines="
                             f"{engine.num_engines})", bundles=[bundle] * engine.num_engines, fields=fields,
                        count_field="engine.num_engines")
    except ResourceError as e:
        raise ResourceError(
            f"{e}. Give the inference nodes that resource: `ray start --resources='{{\"{next(iter(engine.resources))}\": N}}'` "
            "(cluster.yaml: resources of the node type), or remove engine.resources"
        ) from None


def _to_completions(rows: list[dict]) -> list[Completion]:
    return [Completion(**row) for row in rows]


def tensor_parallel_bundles(engine: EngineConfig) -> list[dict[str, float]]:
    """The placement group of one tensor-parallel GPU engine: a GPU per rank, all on one node
    (STRICT_PACK: tensor parallelism across nodes would run its all-reduces over the network).
    Bundle 0 also holds what the engine actor itself asks for (engine.cpus_per_engine and
    engine.resources), since an actor scheduled in a placement group must fit in one of its bundles:
    with the custom resource in none of them it could never start."""
    first = {"GPU": 1.0, "CPU": float(max(1, engine.cpus_per_engine)), **{k: float(v) for k, v in engine.resources.items()}}
    return [first] + [{"GPU": 1.0, "CPU": 1.0}] * (engine.tensor_parallel_size - 1)


class VLLMEnginePool:
    """``engine.num_engines`` Ray actors, each a :class:`LocalEngine`; implements ``Generator``."""

    def __init__(self, model_path: str | Path, engine: EngineConfig | None = None, name: str = "teacher",
                 weight_transfer: str | None = None):
        from rayapp.models.io import resolve_model
        from rayapp.runtime import check_resources, ensure_ray

        engine = engine or EngineConfig()
        self.engine = engine
        self.model_path = str(resolve_model(str(model_path)))
        ray = ensure_ray()
        gpus = engine.num_engines * engine.tensor_parallel_size if engine.use_gpu else 0
        check_resources(cpus=engine.num_engines * engine.cpus_per_engine, gpus=gpus, what=f"the {name} engine pool (engine.num_engines={engine.num_engines})")
        check_engine_resources(ray, engine, name)
        self.weight_transfer = weight_transfer
        self._placement_groups = []
        actor_cls = ray.remote(LocalEngine)
        self.actors = []
        for _ in range(engine.num_engines):
            options: dict[str, Any] = {"num_cpus": engine.cpus_per_engine, "runtime_env": {"env_vars": engine_env(engine)}}
            if engine.resources:
                options["resources"] = dict(engine.resources)
            if engine.use_gpu and engine.tensor_parallel_size == 1:
                options["num_gpus"] = 1
            elif engine.use_gpu:  # vLLM starts its TP workers as Ray actors inside this placement group
                from ray.util.placement_group import placement_group
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg = placement_group(tensor_parallel_bundles(engine), strategy="STRICT_PACK")
                ray.get(pg.ready())
                self._placement_groups.append(pg)
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            self.actors.append(actor_cls.options(**options).remote(self.model_path, engine.model_dump(), weight_transfer))
        self._ray = ray
        self.infos = ray.get([a.info.remote() for a in self.actors])  # waits for every engine to start
        log.info("%s: %d vLLM engine(s) ready (%s)", name, len(self.actors), ", ".join(f"{i['start_seconds']:.0f}s" for i in self.infos))

    def _spread(self, n: int) -> list[list[int]]:
        """Indices 0..n-1 dealt round-robin over the engines (uneven lengths average out)."""
        return [list(range(k, n, len(self.actors))) for k in range(len(self.actors))]

    def generate(self, prompts: list[str] | list[list[dict]], sampling: SamplingConfig | None = None) -> list[Completion]:
        """Completions ordered by (prompt_index, sample_index)."""
        sampling = sampling or SamplingConfig()
        s = sampling.model_dump()
        refs = [
            actor.generate.remote([prompts[i] for i in idx], s, idx)
            for actor, idx in zip(self.actors, self._spread(len(prompts)), strict=True)
            if idx
        ]
        rows = [row for part in self._ray.get(refs) for row in part]
        rows.sort(key=lambda r: (r["prompt_index"], r.get("sample_index", 0)))
        return _to_completions(rows)

    def score(self, sequences: list[list[int]], top_k: int = 0) -> list[list[float]] | list[list[dict[int, float]]]:
        """Per sequence, ``len(seq) - 1`` entries (the first token has none): the logprob of each
        token given its prefix (``top_k`` 0), or {token: logprob} for the top_k tokens plus the
        given one (``top_k`` > 0)."""
        spread = self._spread(len(sequences))
        refs = [a.score.remote([sequences[i] for i in idx], top_k) for a, idx in zip(self.actors, spread, strict=True) if idx]
        out: list = [None] * len(sequences)
        for idx, part in zip([i for i in spread if i], self._ray.get(refs), strict=True):
            for i, values in zip(idx, part, strict=True):
                out[i] = values
        return out

    def node_writers(self) -> list:
        """One engine actor per node that holds engines: the one that writes that node's copy of new weights."""
        first: dict = {}
        for actor, info in zip(self.actors, self.infos, strict=True):
            first.setdefault(info.get("node_id") or id(actor), actor)
        return list(first.values())

    def update_weights(self, state: str | Path | dict) -> float:
        """Load new weights into every engine; ``state`` is a safetensors directory visible on every
        node, or a state dict (Hugging Face parameter names), sent to each engine node through Ray's
        object store (weight_sync.send_buckets). Returns the seconds it took."""
        started = time.perf_counter()
        if isinstance(state, (str, Path)):
            self._ray.get([a.reload_weights.remote(str(state)) for a in self.actors])
        else:
            from rayapp.teachers.weight_sync import send_buckets, state_buckets

            send_buckets(self, state_buckets(dict(state)))
        return time.perf_counter() - started

    def sleep(self) -> None:
        self._ray.get([a.sleep.remote() for a in self.actors])

    def wake(self) -> None:
        self._ray.get([a.wake.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._placement_groups:
            from ray.util.placement_group import remove_placement_group

            for pg in self._placement_groups:
                remove_placement_group(pg)
            self._placement_groups = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
