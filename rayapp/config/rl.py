"""`kind: reward_model`, `kind: rlhf` (ppo | grpo) and `kind: dpo`.

The managed service's knobs map onto these fields:

| managed service                         | here                                                   |
| --------------------------------------- | ------------------------------------------------------ |
| reward_model_train_steps                | reward_model job: ``train.max_steps``                  |
| reinforcement_learning_train_steps      | rlhf job: ``rl.iterations``                            |
| kl_coeff                                | rlhf job: ``rl.kl_coeff``                              |
| reward_model_learning_rate_multiplier   | reward_model job: ``train.learning_rate_multiplier``   |
| reinforcement_learning_rate_multiplier  | rlhf job: ``train.learning_rate_multiplier``           |
| reward model adapter (rank 4)           | reward_model job: ``adapter: {rank: 4}``               |
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rayapp.config.base import DataConfig, EngineConfig, SamplingConfig, StrictModel
from rayapp.config.training import TrainingJobConfig


class RewardModelJobConfig(TrainingJobConfig):
    kind: Literal["reward_model"] = Field("reward_model", description="Job kind.")
    name: str = Field("reward_model", description="Job name; used in logs, the report and as the served model name.")
    output_dir: str = Field("outputs/reward_model", description="Where the job writes model/, checkpoints/, metrics.jsonl, report.html.")
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(train="data/preference/train.jsonl"),
        description="Preference pairs: {input_text|messages, candidate_0, candidate_1, choice} or {prompt, chosen, rejected}.",
    )


class DPOJobConfig(TrainingJobConfig):
    kind: Literal["dpo"] = Field("dpo", description="Job kind.")
    name: str = Field("dpo", description="Job name; used in logs, the report and as the served model name.")
    output_dir: str = Field("outputs/dpo", description="Where the job writes model/, checkpoints/, metrics.jsonl, report.html.")
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(train="data/preference/train.jsonl"),
        description="Preference pairs: {input_text|messages, candidate_0, candidate_1, choice} or {prompt, chosen, rejected}.",
    )
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the implicit KL to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Probability a preference label is flipped (conservative DPO); 0 is plain DPO.")
    reference: Literal["precompute", "frozen"] = Field(
        "precompute",
        description="'precompute': score every pair with the reference once before training, then drop it; "
        "'frozen': keep the frozen reference and score each batch (more memory, same result).",
    )
    reference_model: str | None = Field(None, description="Reference model directory; default model.path (with LoRA, the base with adapters disabled).")


class RewardSpec(StrictModel):
    """One term of the reward: a built-in rule, a user function, weighted and summed."""

    function: str = Field(
        "exact_match",
        description="A built-in reward ('exact_match', 'chain_steps', 'format', 'length') or a user function 'package.module:function' "
        "called as f(completion: str, row: dict, **args) -> float.",
    )
    weight: float = Field(1.0, description="Multiplier of this term in the summed reward.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the function.")


class RLConfig(StrictModel):
    iterations: int = Field(20, gt=0, description="RL iterations (rollout, reward, update, weight sync): the managed service's reinforcement_learning_train_steps.")
    prompts_per_iteration: int = Field(8, gt=0, description="Prompts sampled from the dataset each iteration.")
    update_epochs: int = Field(1, gt=0, description="Passes (PPO epochs) over each iteration's rollouts.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip range.")
    kl_coeff: float = Field(0.05, ge=0, description="Weight of the KL to the frozen reference (in the reward for PPO, in the loss for GRPO); 0 skips loading the reference.")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO GAE lambda.")
    value_coeff: float = Field(0.5, ge=0, description="PPO: weight of the value loss (the value head shares the policy's trunk).")
    value_clip: float | None = Field(0.2, gt=0, description="PPO: value clip range; null disables clipping.")
    value_lr_multiplier: float = Field(10.0, gt=0, description="PPO: learning rate of the (fresh) value head relative to train.learning_rate.")
    whiten_advantages: bool = Field(True, description="PPO: whiten advantages over the whole rollout batch.")
    scale_by_std: bool = Field(True, description="GRPO: divide group-centred rewards by the group std (false: Dr. GRPO).")
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec()], description="Rule-based / user reward terms, summed with their weights.")
    reward_model: str | None = Field(None, description="A reward_model job's model/ directory (or its output_dir), scored by Ray actors; added to the rule rewards.")
    reward_model_weight: float = Field(1.0, description="Multiplier of the reward model's score.")
    reward_model_actors: int = Field(1, gt=0, description="Ray actors serving the reward model.")
    reward_model_cpus: float = Field(0.5, gt=0, description="Logical CPUs each reward-model actor reserves.")
    weight_sync: Literal["auto", "shm", "nccl"] = Field(
        "auto", description="How new weights reach the engines after each update: 'shm' (buckets through Ray's object store into each engine node's /dev/shm, reloaded in place; any node layout, CPU or GPU), 'nccl' (vLLM's NCCL weight transfer from train rank 0; GPU trainers and engines), 'auto': nccl when resources.use_gpu and engine.use_gpu, else shm."
    )
    sync_bucket_mib: int = Field(256, gt=0, description="Weight sync: gathered weights are sent in buckets of this many MiB (no process holds more than two buckets of them at once).")
    sync_check_prompts: int = Field(0, ge=0, description="After each weight sync, the engines generate greedily for this many training prompts and the policy scores those tokens: metrics get sync_check_max_logp_diff (engine vs trainer log-probs; 0 up to numerics when the engines hold the new weights) and sync_check.jsonl the tokens. 0: off.")
    eval_prompts: int = Field(0, ge=0, description="Greedy evaluation on this many validation prompts at the start and every train.eval_every iterations (0: off).")
    tis_cap: float | None = Field(2.0, gt=0, description="Truncated importance sampling: each token's loss is weighted by min(pi_old / q_vllm, tis_cap), correcting for the engine sampling from a slightly different distribution than the trainer computes; null turns the correction off (the mismatch is still logged as mismatch_kl).")


class RLHFJobConfig(TrainingJobConfig):
    kind: Literal["rlhf"] = Field("rlhf", description="Job kind.")
    name: str = Field("rlhf", description="Job name; used in logs, the report and as the served model name.")
    output_dir: str = Field("outputs/rlhf", description="Where the job writes model/, checkpoints/, metrics.jsonl, report.html.")
    algorithm: Literal["ppo", "grpo"] = Field("grpo", description="'ppo': value head, GAE, KL in the reward; 'grpo': n samples per prompt, group-normalised advantages, no critic.")
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(train="data/rl_prompts/train.jsonl"),
        description="Prompts: {input_text} or {messages}; other keys (e.g. answer) reach the reward functions.",
    )
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(max_model_len=256, max_num_seqs=64), description="The vLLM rollout engines.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_tokens=64, n=4),
        description="Rollout sampling; sampling.n is the GRPO group size (PPO: usually 1).",
    )
    rl: RLConfig = Field(default_factory=RLConfig, description="RL loop settings.")

    @model_validator(mode="after")
    def _rl_defaults(self):
        """Engines that return the log-probs of the distribution they sampled from (after
        temperature, top-k, top-p), which truncated importance sampling and mismatch_kl compare
        with the trainer's, unless the user's engine block says otherwise. (A ``sampling:`` block
        given in part keeps the presets above, temperature 1.0 among them: StrictModel.)"""
        if "logprobs_mode" not in self.engine.model_fields_set:
            self.engine = self.engine.model_copy(update={"logprobs_mode": "processed"})
        return self

    @model_validator(mode="after")
    def _check_rl(self):
        if self.sampling.temperature <= 0:
            raise ValueError(f"sampling.temperature is {self.sampling.temperature}, but RL rollouts must be sampled "
                             "(the updates score them at that temperature); set sampling.temperature > 0 (1.0: the policy itself)")
        rollouts = self.rl.prompts_per_iteration * self.sampling.n
        if rollouts % self.train.global_batch_size:
            raise ValueError(
                f"rl.prompts_per_iteration ({self.rl.prompts_per_iteration}) x sampling.n ({self.sampling.n}) = {rollouts} "
                f"rollouts per iteration must be a multiple of train.global_batch_size ({self.train.global_batch_size}), "
                "the rollouts per optimizer step; change one of them"
            )
        if self.algorithm == "grpo" and self.sampling.n < 2:
            raise ValueError(f"algorithm: grpo needs sampling.n >= 2 samples per prompt (found {self.sampling.n}); raise sampling.n or use algorithm: ppo")
        if not self.rl.rewards and not self.rl.reward_model:
            raise ValueError("rl.rewards is empty and rl.reward_model is not set: give at least one reward")
        if self.resources.strategy == "fsdp":
            raise ValueError("resources.strategy: fsdp is not supported for kind: rlhf yet (the reference pass and the weight "
                             "sync to the rollout engines read the policy's whole weights); use resources.strategy: ddp")
        if self.rl.weight_sync == "nccl" and not (self.resources.use_gpu and self.engine.use_gpu):
            raise ValueError("rl.weight_sync: nccl needs GPU trainers and engines (resources.use_gpu: true and engine.use_gpu: true); "
                             "use 'shm' (or 'auto') otherwise")
        return self

    @property
    def rollouts_per_iteration(self) -> int:
        return self.rl.prompts_per_iteration * self.sampling.n

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps of one iteration: rl.update_epochs passes over its rollouts, train.global_batch_size at a time."""
        return self.rl.update_epochs * self.rollouts_per_iteration // self.train.global_batch_size

    def planned_steps(self, rows: int | None = None) -> int:
        return self.rl.iterations * self.steps_per_iteration
