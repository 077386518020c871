"""Config building blocks shared by every job kind.

Every model here forbids unknown fields, defaults every field and documents it
with a one-line description, so ``rayapp validate`` can say what a misspelt or
missing key should have been.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# Adapter sizes the managed service offers; other positive ranks are allowed too.
VERTEX_ADAPTER_SIZES = (1, 2, 4, 8, 16, 32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower().rstrip(".") in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


class StrictModel(BaseModel):
    """A pydantic model that refuses unknown keys, and whose sections given in part keep the
    values their field's default presets (see :func:`keep_section_defaults`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="after")
    def _keep_section_defaults(self):
        return keep_section_defaults(self)


def keep_section_defaults(model: BaseModel) -> BaseModel:
    """A section given in part (``teacher: {sampling: {max_tokens: 24}}``, or the override
    ``teacher.sampling.max_tokens=24``) replaces its field's default_factory whole, so the fields
    it leaves out would take the section class's defaults (SamplingConfig: temperature 0.7) instead
    of the values that factory sets (greedy, for a teacher; GRPO's n: 4; max_model_len 512 ...).
    Put those values back, for every field whose default_factory builds a section with values set."""
    for name, field in type(model).model_fields.items():
        section = getattr(model, name)
        if field.default_factory is None or not isinstance(section, BaseModel):
            continue
        preset = field.default_factory()
        if not isinstance(preset, BaseModel) or not preset.model_fields_set:
            continue
        values = preset.model_dump(exclude_unset=True)
        missing = {k: v for k, v in values.items() if k not in section.model_fields_set}
        if missing:
            setattr(model, name, section.model_copy(update=missing))
    return model


class ModelConfig(StrictModel):
    path: str = Field("tiny", description="A local Hugging Face directory; a built-in name: 'tiny' (or e.g. 'tiny:layers=4,hidden=256'), 'smollm2-135m-instruct'; or a Hugging Face Hub id 'ORG/NAME', pinned as 'ORG/NAME@REVISION' (branch, tag or commit), fetched once into the Hugging Face cache ($RAYAPP_HF_CACHE: one every node reads; HF_HUB_OFFLINE=1: the cache only).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype for training (float32 on CPU: bf16 is slow without AVX-512).")
    trust_remote_code: bool = Field(False, description="Allow model code shipped inside the model directory to run.")
    max_seq_len: int = Field(512, gt=8, description="Longest tokenized example; longer ones are truncated (or flagged as bad rows).")


def _report_to_list(value):
    """`report_to: tensorboard` or `[tensorboard, mlflow]`; 'none' or null for no tracker; repeats dropped."""
    if value is None or value == "none":
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return list(dict.fromkeys(value))
    return value


# Experiment trackers a training job reports to (rayapp/tracking.py; TrainingJobConfig.report_to).
TaskType = Literal["free", "choice", "yesno", "number"]  # the names rayapp.teachers.templates.TASK_TYPES knows

ReportTo = Annotated[list[Literal["tensorboard", "mlflow", "wandb"]], BeforeValidator(_report_to_list)]
REPORT_TO_DESCRIPTION = (
    "Experiment trackers that get every metrics.jsonl series, the resolved config and the report: "
    "tensorboard (output_dir/tensorboard), mlflow ($MLFLOW_TRACKING_URI, else output_dir/mlruns), wandb "
    "(offline in output_dir/wandb unless logged in or $WANDB_MODE says otherwise). Needs rayapp[track]."
)


class DataConfig(StrictModel):
    train: str = Field("data/train.jsonl", description="Training data: a .jsonl or .parquet file, or a saved `datasets` directory.")
    validation: str | None = Field(None, description="Validation data in the same format; omit to hold out `validation_split` of train.")
    validation_split: float = Field(0.0, ge=0.0, lt=0.5, description="Fraction of train held out for validation when no validation file is given.")
    format: Literal["auto", "text", "chat"] = Field("auto", description="Row format: input_text/output_text, messages/contents, or detect per row.")
    on_bad_rows: Literal["error", "drop"] = Field("error", description="'error' stops before training at the first bad rows; 'drop' skips them and counts them in the stats.")
    overlong: Literal["truncate", "bad_row"] = Field("truncate", description="What to do with an example longer than model.max_seq_len.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of each file (quick experiments).")
    chat_template: Literal["auto", "always", "never"] = Field("auto", description="Render rows with the tokenizer's chat template: 'auto' uses it when the tokenizer has one; 'never' joins input_text and output_text as plain text.")


class TrainConfig(StrictModel):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractional allowed); ignored when max_steps is set.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    global_batch_size: int = Field(16, gt=0, description="Examples per optimizer step, over all workers.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per forward/backward on one worker; gradient accumulation fills the rest.")
    learning_rate: float = Field(1.0e-4, gt=0, description="Peak learning rate of AdamW.")
    learning_rate_multiplier: float = Field(1.0, gt=0, description="Vertex-style multiplier applied to learning_rate.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warm-up before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to learning_rate * min_lr_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this global norm; null disables clipping.")
    eval_every: int = Field(50, gt=0, description="Run validation every N optimizer steps (and at the end).")
    checkpoint_every: int = Field(50, gt=0, description="Save a resumable checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep.")
    log_every: int = Field(1, gt=0, description="Append a metrics.jsonl row every N optimizer steps.")
    seed: int = Field(0, description="Seed for data order, initialisation and sampling.")
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field("auto", description="'bf16-mixed': float32 master weights and AdamW state, bf16 compute, float32 gradient reduction; 'fp32': no casting; 'auto': bf16-mixed with resources.use_gpu, fp32 on CPU (no fast bf16 there).")
    activation_checkpointing: bool = Field(False, description="Recompute each decoder layer's activations in backward instead of storing them: less memory, about a third more compute.")
    packing: bool = Field(False, description="Lay each micro-batch's examples end to end in rows of up to model.max_seq_len tokens (attention never crosses examples, position ids restart per example) instead of padding every example to the longest: same loss and gradients, less compute on uneven data. kind: sft and distill (step_by_step, logits, features, self).")

    @property
    def peak_lr(self) -> float:
        return self.learning_rate * self.learning_rate_multiplier

    def resolved_precision(self, use_gpu: bool) -> str:
        """'fp32' or 'bf16-mixed': what ``precision`` means on GPUs (use_gpu) or CPUs."""
        if self.precision != "auto":
            return self.precision
        return "bf16-mixed" if use_gpu else "fp32"


def check_precision(model: ModelConfig, train: TrainConfig, use_gpu: bool) -> None:
    """bf16-mixed keeps float32 master weights, so the model must be loaded in float32."""
    if train.resolved_precision(use_gpu) == "bf16-mixed" and model.dtype != "float32":
        why = "train.precision: bf16-mixed" if train.precision != "auto" else \
            "train.precision: auto (bf16-mixed because resources.use_gpu is true)"
        raise ValueError(
            f"model.dtype: {model.dtype} with {why}: mixed precision keeps float32 master weights and AdamW state "
            f"and computes in bf16, so the weights must load as float32. Set model.dtype: float32 (compute is still "
            f"bf16), or train.precision: fp32 to train the {model.dtype} weights themselves ({model.dtype} AdamW "
            f"state, small updates lost to rounding)"
        )


class AdapterConfig(StrictModel):
    rank: int = Field(8, gt=0, description="LoRA rank (Vertex's adapter_size; 1, 2, 4, 8, 16, 32 are its choices).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to 2 * rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | str = Field("all-linear", description="Module names to adapt, or 'all-linear'.")
    export: Literal["adapter", "merged", "both"] = Field("both", description="Write adapter/, a merged model/, or both.")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class ResourcesConfig(StrictModel):
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one per GPU on a cluster; 8 is the usual job size).")
    use_gpu: bool = Field(False, description="Give each worker GPUs (NCCL); false trains on CPU over gloo.")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu is true.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs Ray reserves per worker.")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: a full replica of the model per worker, gradients all-reduced. fsdp: FSDP2, each worker keeps 1/num_workers of every parameter, gradient and AdamW state and gathers one decoder layer at a time (for models whose weights and optimizer state do not fit one device).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="How Ray places the workers: PACK fills as few nodes as possible (8 workers of 1 GPU on one 8-GPU node: NVLink between them); SPREAD puts them on different nodes where it can; STRICT_ variants fail instead of falling back.")
    max_failures: int = Field(0, ge=0, description="Restarts of the worker group from the last checkpoint after a worker dies.")
    gpu_memory_gib: float | None = Field(None, gt=0, description="Memory of one device, for `rayapp plan` (default: 80 for GPUs, host memory for CPU).")


class DeployConfig(StrictModel):
    enabled: bool = Field(False, description="Serve the job's result on Ray Serve when it succeeds.")
    name: str | None = Field(None, description="Model name clients send in the `model` field; defaults to the job name.")
    host: str = Field("127.0.0.1", description="HTTP host for Ray Serve's proxy.")
    port: int = Field(8000, gt=0, lt=65536, description="HTTP port for Ray Serve's proxy.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: int = Field(16, gt=0, description="Autoscaling target of in-flight requests per replica.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key; clients must send it as a Bearer token.")
    api_key_file: str | None = Field(None, description="File holding the API key (alternative to api_key_env).")
    max_model_len: int | None = Field(None, gt=0, description="Context length of the served engine (default: the model's).")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per replica on a cluster.")
    use_gpu: bool = Field(False, description="Serve on GPUs; false serves with the vLLM CPU build.")
    blocking: bool = Field(False, description="Keep the CLI in the foreground serving until Ctrl-C.")
    max_num_seqs: int = Field(64, gt=0, description="Requests one replica's engine batches together.")
    kv_cache_gib: int = Field(1, gt=0, description="KV cache GiB per replica on CPU (VLLM_CPU_KVCACHE_SPACE).")
    route_prefix: str = Field("/", description="URL prefix of the app on the Serve proxy (one app per prefix).")
    max_n: int = Field(8, gt=0, description="Most completions one request may ask for: n (or best_of) times the number of prompts; more is a 400.")
    max_tokens_limit: int = Field(2048, gt=0, description="Most tokens one completion may ask for (max_tokens / max_completion_tokens; more is a 400); a chat request without either gets this cap.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body in bytes (default 1 MiB); a larger one is refused with a 413 before it is parsed.")
    allow_unauthenticated: bool = Field(False, description="Serve on a non-loopback deploy.host without an API key (anyone who reaches the port may call the model).")

    @model_validator(mode="after")
    def _check_replicas(self) -> DeployConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"deploy.min_replicas ({self.min_replicas}) is larger than deploy.max_replicas "
                f"({self.max_replicas}); raise max_replicas or lower min_replicas"
            )
        return self

    @model_validator(mode="after")
    def _check_exposure(self) -> DeployConfig:
        if is_loopback(self.host) or self.api_key_env or self.api_key_file or self.allow_unauthenticated:
            return self
        raise ValueError(
            f"deploy.host: {self.host} serves other machines, and no API key is set (deploy.api_key_env / "
            f"deploy.api_key_file): anyone who reaches the port could call the model. Set a key, e.g. "
            f"`export MY_KEY=$(openssl rand -hex 32)` and deploy.api_key_env: MY_KEY (rayapp deploy --api-key-env "
            f"MY_KEY); or keep deploy.host: 127.0.0.1; or set deploy.allow_unauthenticated: true "
            f"(--allow-unauthenticated) to serve it open on purpose"
        )


class EngineConfig(StrictModel):
    """A vLLM engine pool: the teacher for distillation, the rollout engine for RL."""

    num_engines: int = Field(1, gt=0, description="vLLM engine actors in the pool.")
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs per engine on a cluster.")
    use_gpu: bool = Field(False, description="Run engines on GPUs; false uses the vLLM CPU build.")
    cpus_per_engine: float = Field(1.0, gt=0, description="Logical CPUs Ray reserves per engine actor.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine (and each batch replica) asks for besides CPUs/GPUs, to keep engines on "
                    "dedicated inference nodes: e.g. {inference: 1} with those nodes started `ray start --resources='{\"inference\": 8}'` "
                    "(cluster.yaml: the node type's resources). Empty: any node.")
    max_model_len: int = Field(1024, gt=16, description="Engine context length (prompt + generation).")
    max_num_seqs: int = Field(64, gt=0, description="Sequences batched together by the engine.")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of device memory vLLM takes on GPU.")
    enforce_eager: bool = Field(True, description="Skip graph compilation (much faster start on CPU).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("float32", description="Engine dtype (float32 on CPU).")
    seed: int = Field(0, description="Engine sampling seed.")
    logprobs_mode: Literal["raw", "processed"] = Field(
        "raw", description="Log-probs the engine returns (sampling.logprobs): 'raw' from the model's logits (temperature 1), "
                           "'processed' from the distribution it samples from (after temperature, top-k, top-p; vLLM's "
                           "processed_logprobs). kind: rlhf defaults to 'processed'.")
    cpu_threads_bind: str = Field(
        "auto", pattern=r"^(auto|all|nobind|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$",
        description="CPU engines only (VLLM_CPU_OMP_THREADS_BIND). 'auto', vLLM's default, keeps one core per engine "
                    "for its scheduler process and uses one thread per physical core: on a 2-core machine the model "
                    "gets one thread. 'all' binds the model's threads to every core of the engine's machine (1.7x the "
                    "tokens/s of 'auto' on 2 cores, bench/teacher_throughput.py); use it with one engine per machine. "
                    "A core list such as '0-3' binds exactly those cores; 'nobind' leaves threads unbound.")


class SamplingConfig(StrictModel):
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, description="Top-k sampling; -1 disables.")
    max_tokens: int = Field(256, gt=0, description="Most tokens generated per completion.")
    n: int = Field(1, gt=0, description="Completions per prompt.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion.")
    logprobs: int | None = Field(None, ge=0, description="Return the top-k logprobs of each generated token.")
    seed: int | None = Field(None, description="Per-request seed for reproducible sampling.")
