"""Training maths as pure torch functions: tensors in, tensors out.

No ray, vllm or transformers imports anywhere in this package (a test checks it). Modules:
``sft`` (token NLL sums), ``step_by_step`` (two-task distillation), ``kd`` (logit KD / GKD),
``features`` (hidden-state KD), ``relations`` (RKD / similarity KD), ``preference`` (reward
model, DPO), ``rl`` (GAE, GRPO, PPO, KL estimators), ``on_policy`` (on-policy distillation:
reverse-KL token advantages). Import the submodule you need; this package
itself holds only :data:`IGNORE_INDEX`, which the data layer shares without importing torch.
"""

IGNORE_INDEX = -100  # the label of positions no loss is taken on (prompt, padding): cross_entropy's default
