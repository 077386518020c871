"""Training recipes on Ray Train: one module per job kind (sft, dpo, reward_model, rlhf, and the
distill package), built on ``launch`` (all of Ray Train), ``loop`` (the Ray-free step loop and
optimizer), ``checkpoint`` and ``outputs`` (the start and the ending every recipe shares).
The table of job kinds is :mod:`rayapp.kinds`."""
