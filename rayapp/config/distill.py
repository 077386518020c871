"""`kind: distill` — train a smaller student to mimic a teacher.

``method`` picks one of six: step_by_step (labels + teacher rationales as two tasks), logits
(teacher token distributions from vLLM), features (hidden layers), relations (pairwise
structure of a batch), self (teacher and student share the architecture) and on_policy (the
student samples with its own vLLM engines, the teacher's engines score those tokens, the
student follows the per-token reverse KL as an RL advantage). Only the section
of the chosen method is read; the others keep their defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayapp.config.base import EngineConfig, SamplingConfig, StrictModel, TaskType
from rayapp.config.batch import RationalesConfig, check_rationale_sampling
from rayapp.config.training import TrainingJobConfig

METHODS = ("step_by_step", "logits", "features", "relations", "self", "on_policy")


class StudentConfig(StrictModel):
    init: Literal["from_model", "from_teacher_layers"] = Field("from_model", description="'from_model': the student is model.path; 'from_teacher_layers': a copy of teacher.path keeping some of its layers (DistilBERT-style).")
    keep_every: int = Field(2, gt=0, description="from_teacher_layers: keep teacher layers k-1, 2k-1, ... (every k-th, the last one always kept).")
    layers: list[int] | None = Field(None, description="from_teacher_layers: explicit 0-based teacher layer indices to keep (overrides keep_every).")


class TeacherConfig(StrictModel):
    path: str | None = Field(None, description="Teacher model: a directory or a built-in name. Needed by every method but self (which defaults to model.path).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Teacher weights dtype inside the training workers (features, relations, self).")
    outputs: str | None = Field(None, description="step_by_step: a teacher-output file (kind: batch, task: rationales) to use instead of generating; rows need input_text, label, rationale, teacher.")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_model_len=512), description="vLLM engines of the teacher (step_by_step rationales, logits).")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=128), description="Sampling of teacher rationales / responses.")
    rationales: RationalesConfig = Field(default_factory=RationalesConfig, description="Prompt template, parsing and gold-label filtering of teacher rationales (step_by_step); rationales.task_type is the job's task_type.")
    chat: Literal["auto", "always", "never"] = Field("auto", description="Send questions to the teacher as a user message through its chat template ('auto': when the teacher has one), as kind: batch does.")


class StepByStepConfig(StrictModel):
    rationale_weight: float = Field(0.5, ge=0, le=1, description="1 - alpha in alpha * L_label + (1 - alpha) * L_rationale; 0 is standard fine-tuning on the same labels.")
    predict_prefix: str = Field("predict: ", description="Task prefix of the label task (the one asked at inference).")
    explain_prefix: str = Field("explain: ", description="Task prefix of the rationale task.")
    explain_target: Literal["rationale_and_label", "rationale"] = Field(
        "rationale_and_label",
        description="Target of the rationale task: 'rationale_and_label' is the rationale then 'So the answer is <label>.' "
                    "(the teacher's whole chain of thought; higher label accuracy in bench/distill_quality.py); "
                    "'rationale' is the rationale alone, as in the paper's reference code.")


class LogitsConfig(StrictModel):
    top_k: int = Field(20, gt=0, description="Teacher log-probs kept per position (vLLM returns the top k).")
    topk_mode: Literal["tail", "renormalise"] = Field("tail", description="'tail': K tokens plus one bucket for the rest (a true divergence); 'renormalise': both restricted to the K tokens.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="Token divergence; 'jsd' uses beta.")
    beta: float = Field(0.5, ge=0, le=1, description="GKD beta: 0 forward KL, 1 reverse KL, between the generalised JSD.")
    temperature: float = Field(1.0, gt=0, description="Must be 1: the teacher's top-k log-probs come from vLLM at temperature 1, so only the student's logits could be softened (the validator refuses other values).")
    responses: Literal["given", "teacher"] = Field("given", description="Sequence-level KD over the rows' output_text ('given') or over responses the teacher writes ('teacher').")
    lmbda: float = Field(0.0, ge=0, le=1, description="GKD on-policy fraction: share of prompts answered by the student (sampled between rounds) and scored by the teacher.")
    rounds: int = Field(1, gt=0, description="On-policy rounds: export student -> sample -> teacher scores -> train; each round trains train.max_steps / rounds steps.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the plain next-token NLL on the response added to the KD loss.")


class FeaturesConfig(StrictModel):
    layer_map: list[tuple[int, int]] | None = Field(None, description="[[student_layer, teacher_layer], ...] as hidden_states indices (0 = embeddings); default: TinyBERT's uniform map.")
    loss: Literal["mse", "cosine"] = Field("mse", description="Per-token feature loss after the learned projection.")
    weight: float = Field(1.0, ge=0, description="Weight of the feature loss.")
    task_weight: float = Field(1.0, ge=0, description="Weight of the task (response NLL) loss.")


class RelationsConfig(StrictModel):
    loss: Literal["rkd_distance", "rkd_angle", "similarity"] = Field("rkd_distance", description="Relation between the examples of a micro-batch that the student matches.")
    student_layer: int = Field(-1, description="Student hidden_states index pooled per example (-1: the last layer).")
    teacher_layer: int = Field(-1, description="Teacher hidden_states index pooled per example (-1: the last layer).")
    weight: float = Field(1.0, ge=0, description="Weight of the relation loss.")
    task_weight: float = Field(1.0, ge=0, description="Weight of the task (response NLL) loss.")


class SelfDistillConfig(StrictModel):
    teacher: Literal["frozen", "ema"] = Field("frozen", description="'frozen': teacher.path (default model.path, or an earlier checkpoint's model dir) stays fixed; 'ema': an exponential moving average of the student.")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="EMA teacher: teacher <- decay * teacher + (1 - decay) * student after every step.")
    rounds: int = Field(1, gt=0, description="Born-again generations: round r's teacher is round r-1's student (frozen teacher only).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="Token divergence to the teacher's full distribution.")
    beta: float = Field(0.5, ge=0, le=1, description="jsd beta.")
    temperature: float = Field(1.0, gt=0, description="Softening temperature (loss scaled by T^2).")
    weight: float = Field(1.0, ge=0, description="Weight of the KD loss.")
    task_weight: float = Field(1.0, ge=0, description="Weight of the task (response NLL) loss.")


class OnPolicyConfig(StrictModel):
    iterations: int = Field(20, gt=0, description="Iterations of: the student samples, the teacher scores those tokens, the student updates, its new weights reach its engines.")
    prompts_per_iteration: int = Field(8, gt=0, description="Prompts of data.train the student answers each iteration.")
    samples_per_prompt: int = Field(4, gt=0, description="Completions the student samples per prompt.")
    max_new_tokens: int = Field(48, gt=0, description="Most tokens per sampled completion.")
    temperature: float = Field(1.0, gt=0, description="Student sampling temperature; the trainer's log-probs use the same one (logits / T), the teacher's are at T = 1.")
    reward_weight: float = Field(0.0, ge=0, description="Weight of a task reward (1 when the completion's answer matches the row's output_text, else 0) added to every token's advantage; 0: pure distillation.")
    top_k: int = Field(0, ge=0, le=20, description="0: the teacher scores only the sampled tokens (the per-token reverse-KL advantage alone). k > 0: it also returns its top-k log-probs at every sampled position and the loss adds topk_weight x the reverse KL between the student's and the teacher's next-token distributions over those k tokens plus a tail bucket, on the student's own prefixes (dense supervision; vLLM returns at most 20).")
    topk_weight: float = Field(1.0, ge=0, description="Weight of the top-k reverse-KL term (on_policy.top_k > 0), per token as the policy loss.")
    update_epochs: int = Field(1, gt=0, description="Passes over each iteration's samples (train.global_batch_size samples per optimizer step).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip range; matters from the second optimizer step on the same samples.")
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_model_len=256, max_num_seqs=64), description="The student's vLLM engines (the teacher's are teacher.engine).")
    weight_sync: Literal["auto", "shm", "nccl"] = Field("auto", description="How the student's new weights reach its engines after every iteration (as rl.weight_sync of kind: rlhf).")
    sync_bucket_mib: int = Field(256, gt=0, description="Weight sync bucket size in MiB.")
    eval_examples: int = Field(64, ge=0, description="Held-out rows (evaluation.data) the student's engines answer greedily before training and every train.eval_every iterations: val_answer_accuracy in metrics.jsonl (0: off).")


class DistillEvalConfig(StrictModel):
    data: str | None = Field(None, description="Held-out rows {input_text, output_text} whose answers are checked (default: data.validation when it has labels).")
    max_examples: int | None = Field(200, gt=0, description="Check at most this many rows.")
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per answer.")
    teacher: bool = Field(False, description="Also measure the teacher's accuracy on the same rows (with its rationale prompt).")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Greedy generation with transformers in this process, or a vLLM engine (teacher.engine settings).")


class DistillJobConfig(TrainingJobConfig):
    kind: Literal["distill"] = Field("distill", description="Job kind.")
    name: str = Field("distill", description="Job name; used in logs, the report and as the served model name.")
    output_dir: str = Field("outputs/distill", description="Where the job writes model/, teacher/, checkpoints/, metrics.jsonl, eval.json, report.html.")
    method: Literal["step_by_step", "logits", "features", "relations", "self", "on_policy"] = Field("step_by_step", description="Distillation method.")
    task_type: TaskType = Field("free", description="Answer kind: how answers are parsed and compared in evaluation (and teacher rationales).")
    student: StudentConfig = Field(default_factory=StudentConfig, description="How the student is initialised.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="The teacher model and how it is run.")
    step_by_step: StepByStepConfig = Field(default_factory=StepByStepConfig, description="method: step_by_step.")
    logits: LogitsConfig = Field(default_factory=LogitsConfig, description="method: logits.")
    features: FeaturesConfig = Field(default_factory=FeaturesConfig, description="method: features.")
    relations: RelationsConfig = Field(default_factory=RelationsConfig, description="method: relations.")
    self_: SelfDistillConfig = Field(default_factory=SelfDistillConfig, alias="self", description="method: self.")
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="method: on_policy.")
    evaluation: DistillEvalConfig = Field(default_factory=DistillEvalConfig, description="Answer accuracy on held-out rows after training.")

    model_config = {**TrainingJobConfig.model_config, "populate_by_name": True, "serialize_by_alias": True}

    @model_validator(mode="after")
    def _check_method(self):
        m = self.method
        # step_by_step needs a teacher only for rows without label or rationale: checked with the data.
        needs_teacher = m in ("logits", "features", "relations", "on_policy") or self.student.init == "from_teacher_layers"
        if needs_teacher and self.teacher.path is None:
            why = f"method: {m}" if m in ("logits", "features", "relations", "on_policy") else "student.init: from_teacher_layers"
            raise ValueError(f"teacher.path is missing but {why} needs a teacher; set teacher.path to a model directory or built-in name")
        if self.adapter is not None and (m in ("features", "relations") or (m == "self" and self.self_.teacher == "ema")):
            raise ValueError(f"adapter (LoRA) with method: {m} is not supported here; remove adapter: for full tuning of the student")
        if self.resources.strategy == "fsdp" and m in ("features", "relations", "self"):
            raise ValueError(f"resources.strategy: fsdp with method: {m} is not supported (the teacher lives in each worker); use ddp")
        if m == "relations":
            need = 3 if self.relations.loss == "rkd_angle" else 2
            if self.train.micro_batch_size < need:
                raise ValueError(f"relations.loss: {self.relations.loss} compares examples within a micro-batch and needs "
                                 f"train.micro_batch_size >= {need}, found {self.train.micro_batch_size}")
        if m == "self" and self.self_.teacher == "ema" and self.self_.rounds > 1:
            raise ValueError("self.rounds > 1 (born-again) needs self.teacher: frozen; an EMA teacher has no generations")
        if m == "on_policy":
            self._check_on_policy()
        if m == "logits" and self.logits.temperature != 1.0:
            raise ValueError(
                f"logits.temperature is {self.logits.temperature}, but method: logits receives the teacher's top-k log-probs "
                "from vLLM at temperature 1 (their log-softmax cannot be re-softened: the rest of the vocabulary is missing), "
                "so only the student would be softened and the two would be compared at different temperatures; set "
                "logits.temperature: 1, or use method: self (the teacher runs in the worker and self.temperature softens both)")
        if m == "logits" and self.logits.lmbda > 0 and self.train.max_steps is None:
            raise ValueError("logits.lmbda > 0 (on-policy rounds) needs train.max_steps (split evenly over logits.rounds)")
        # Teacher rationales are parsed, and their labels compared, as answers of the job's task_type.
        r = self.teacher.rationales
        if "task_type" not in r.model_fields_set:
            r.task_type = self.task_type
        elif r.task_type != self.task_type:
            raise ValueError(f"teacher.rationales.task_type ({r.task_type}) differs from task_type ({self.task_type}); the teacher's "
                             "answers are parsed and checked as the job's task_type: drop teacher.rationales.task_type or make them equal")
        check_rationale_sampling(r, self.teacher.sampling, "teacher.")
        return self

    @property
    def on_policy_steps_per_iteration(self) -> int:
        """method: on_policy: optimizer steps of one iteration (update_epochs passes over its samples)."""
        op = self.on_policy
        return op.update_epochs * op.prompts_per_iteration * op.samples_per_prompt // self.train.global_batch_size

    def planned_steps(self, rows: int | None = None) -> int | None:
        if self.method == "on_policy":
            return self.on_policy.iterations * self.on_policy_steps_per_iteration
        return super().planned_steps(rows)

    def packing_refusal(self) -> str | None:
        if self.method == "relations":
            return "method: relations compares whole examples within a micro-batch (pooled over each one's tokens)"
        if self.method == "on_policy":
            return "method: on_policy trains on the student's own rollouts, scored as whole sequences"
        return None

    def _check_on_policy(self) -> None:
        op = self.on_policy
        samples = op.prompts_per_iteration * op.samples_per_prompt
        if samples % self.train.global_batch_size:
            raise ValueError(
                f"on_policy.prompts_per_iteration ({op.prompts_per_iteration}) x on_policy.samples_per_prompt ({op.samples_per_prompt}) "
                f"= {samples} samples per iteration must be a multiple of train.global_batch_size ({self.train.global_batch_size}), "
                "the samples per optimizer step; change one of them")
        if self.adapter is not None:
            raise ValueError("adapter (LoRA) with method: on_policy is not supported yet; remove adapter: for full tuning of the student")
        if self.resources.strategy == "fsdp":
            raise ValueError("resources.strategy: fsdp with method: on_policy is not supported (the weight sync to the student's "
                             "engines reads the whole weights, as kind: rlhf); use resources.strategy: ddp")
        if op.weight_sync == "nccl" and not (self.resources.use_gpu and op.engine.use_gpu):
            raise ValueError("on_policy.weight_sync: nccl needs GPU trainers and engines (resources.use_gpu: true and "
                             "on_policy.engine.use_gpu: true); use 'shm' (or 'auto') otherwise")
        if op.max_new_tokens >= op.engine.max_model_len:
            raise ValueError(f"on_policy.max_new_tokens ({op.max_new_tokens}) must be below on_policy.engine.max_model_len "
                             f"({op.engine.max_model_len}), which also holds the prompt; lower one or raise the other")
        if self.teacher.engine.max_model_len < op.engine.max_model_len:
            raise ValueError(f"teacher.engine.max_model_len ({self.teacher.engine.max_model_len}) is below on_policy.engine.max_model_len "
                             f"({op.engine.max_model_len}): the teacher scores whole student sequences (prompt + completion); "
                             "raise teacher.engine.max_model_len")
        if self.train.max_steps is not None:
            raise ValueError("train.max_steps is set but method: on_policy counts on_policy.iterations (each runs "
                             "on_policy.update_epochs x samples / train.global_batch_size optimizer steps); remove train.max_steps")
