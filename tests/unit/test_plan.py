"""`rayapp plan`: parameter counts, memory and compute against numbers computed by hand."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import Field

from rayapp import plan as P
from rayapp.config import load_job
from rayapp.config.base import EngineConfig, ModelConfig, SamplingConfig, StrictModel
from tests.conftest import ROOT

# SmolLM2-135M's published config.json (HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "tie_word_embeddings": True, "max_position_embeddings": 8192,
}
# 49152*576 embeddings + 30 * (576*576 q + 576*192 k + 576*192 v + 576*576 o + 3*576*1536 mlp + 2*576 norms) + 576
SMOLLM2_PARAMS = 28_311_552 + 30 * 3_540_096 + 576
assert SMOLLM2_PARAMS == 134_515_008  # the size the model card states (134.5M)


@pytest.fixture
def smol_dir(tmp_path):
    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMOLLM2))
    return d


def test_param_count_from_config_only(smol_dir):
    shape = P.model_shape(str(smol_dir))
    assert shape.exact_params is None  # no weights in the directory: the formula is used
    assert shape.head_dim == 64 and shape.kv_heads == 3
    assert shape.params == 134_515_008


def test_lora_params_all_linear_and_subset(smol_dir):
    shape = P.model_shape(str(smol_dir))
    # rank 8: q 8*(576+576) + k,v 8*(576+192) each + o 8*(576+576) + gate,up,down 8*(576+1536) each, 30 layers
    per_layer = 9216 + 6144 + 6144 + 9216 + 3 * 16896
    assert shape.lora_params(8) == 30 * per_layer == 2_442_240
    assert shape.lora_params(8, ["q_proj", "v_proj"]) == 30 * (9216 + 6144)
    with pytest.raises(P.PlanError, match="target_modules"):
        shape.lora_params(8, ["qkv"])


def test_full_tuning_memory_by_hand(smol_dir):
    shape = P.model_shape(str(smol_dir))
    m = P.training_memory(shape, "bfloat16", micro_batch=4, seq_len=2048)
    assert m.weights == 134_515_008 * 2
    assert m.gradients == 134_515_008 * 2
    assert m.optimizer == 134_515_008 * 8
    # 4*2048*576*30*34 bytes (16-bit) + fp32 logits and their gradient 4*2048*49152*4*2
    assert m.activations == 4_812_963_840 + 3_221_225_472
    assert m.kv_cache == 0
    assert m.total == pytest.approx(269_030_016 * 2 + 1_076_120_064 + 8_034_189_312)

    fp32 = P.training_memory(shape, "float32", micro_batch=4, seq_len=2048)
    assert fp32.weights == 134_515_008 * 4
    assert fp32.activations == 2 * 4_812_963_840 + 3_221_225_472


def test_lora_and_fsdp_memory_by_hand(smol_dir):
    shape = P.model_shape(str(smol_dir))
    a = 2_442_240
    m = P.training_memory(shape, "bfloat16", micro_batch=1, seq_len=512, lora_params=a)
    assert m.weights == 134_515_008 * 2 + a * 4  # adapters stay float32
    assert m.gradients == a * 4  # frozen weights have no gradients
    assert m.optimizer == a * 8
    f = P.training_memory(shape, "bfloat16", micro_batch=1, seq_len=512, num_workers=8, strategy="fsdp")
    assert f.weights == 134_515_008 * 2 / 8
    assert f.gradients == 134_515_008 * 2 / 8
    assert f.optimizer == 134_515_008 * 8 / 8
    d = P.training_memory(shape, "bfloat16", micro_batch=1, seq_len=512, num_workers=8, strategy="ddp")
    assert d.weights == 134_515_008 * 2  # ddp keeps a full replica


def test_fsdp_bf16_mixed_and_checkpointing_by_hand(smol_dir):
    shape = P.model_shape(str(smol_dir))
    p = 134_515_008
    root, layer = 49152 * 576 + 576, 3_540_096  # embeddings (tied lm_head) + final norm; one decoder layer
    assert (shape.root_params, shape.layer_params) == (root, layer) and root + 30 * layer == p
    f = P.training_memory(shape, "float32", micro_batch=1, seq_len=512, num_workers=8, strategy="fsdp",
                          precision="bf16-mixed")
    # every dim 0 of SmolLM2 divides by 8: exactly 1/8 of float32 masters, gradients and AdamW state
    assert (f.weights, f.gradients, f.optimizer) == (p * 4 / 8, p * 4 / 8, p * 8 / 8)
    # bf16 root + 2 layers gathered, and the root's full gradient in bf16 plus its float32 reduce copy
    assert f.gathered == 2 * (root + 2 * layer) + (2 + 4) * root == 240_657_408
    # 16-bit activations (34 B per token, hidden unit and layer), float32 logits + gradient, bf16 logits
    assert f.activations == 512 * 576 * 30 * 34 + 512 * 49152 * (8 + 2)
    ac = P.training_memory(shape, "float32", micro_batch=1, seq_len=512, num_workers=8, strategy="fsdp",
                           precision="bf16-mixed", activation_checkpointing=True)
    assert ac.activations == 512 * 576 * (30 * 2 + 34) + 512 * 49152 * (8 + 2)  # layer inputs + one layer
    assert ac.total < f.total
    d = P.training_memory(shape, "float32", micro_batch=1, seq_len=512, num_workers=8, strategy="ddp",
                          precision="bf16-mixed")
    assert (d.weights, d.gradients, d.optimizer, d.gathered) == (p * 4, p * 4, p * 8, p * 2)  # + autocast's bf16 copy
    fp32 = P.training_memory(shape, "float32", micro_batch=1, seq_len=512, num_workers=8, strategy="fsdp")
    assert fp32.gathered == 4 * (root + 2 * layer) + 4 * root
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        P.training_memory(shape, precision="auto")


def test_uneven_fsdp_split_counts_the_fullest_worker():
    # torch.chunk on dim 0: 5 rows over 2 workers is 3 + 2, 4 rows is 2 + 2
    assert P.fsdp_shard_params([(5, 3), (4,)], 2) == 3 * 3 + 2
    assert P.fsdp_shard_params([(3, 7)], 8) == 7  # fewer rows than workers: one row on the fullest


def test_plan_notes_precision_and_suggests_checkpointing(tmp_path, smol_dir):
    job = _job(tmp_path, smol_dir, "train: {max_steps: 5, global_batch_size: 64, micro_batch_size: 8}\n"
                                   "resources: {num_workers: 8, use_gpu: true, gpu_memory_gib: 4, strategy: fsdp}\n")
    (part,) = P.estimate_plan(load_job(job)).parts
    assert any("precision bf16-mixed" in n for n in part.notes)
    assert any("12.50% of the parameters" in n for n in part.notes)
    assert any(s.startswith("train.activation_checkpointing: true") for s in part.suggestions)
    (ac,) = P.estimate_plan(load_job(job, ["train.activation_checkpointing=true"])).parts
    assert ac.memory.activations < part.memory.activations
    assert not any("activation_checkpointing" in s for s in ac.suggestions)


def test_kv_cache_by_hand(smol_dir):
    shape = P.model_shape(str(smol_dir))
    assert shape.kv_bytes_per_token(2) == 2 * 30 * 3 * 64 * 2 == 23_040
    m = P.engine_memory(shape, "bfloat16", tokens=64 * 1024, tensor_parallel=2)
    assert m.kv_cache == 23_040 * 64 * 1024 / 2
    assert m.weights == 134_515_008 * 2 / 2


def test_formula_matches_real_weights(tiny_model_dir):
    shape = P.model_shape("tiny")
    assert shape.exact_params == shape.formula_params
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert numel == shape.params


def _job(tmp_path, smol_dir, body: str, rows: int = 100):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input_text": f"q{i}", "output_text": "a"}) + "\n" for i in range(rows)))
    job = tmp_path / "job.yaml"
    job.write_text(f"kind: sft\nmodel: {{path: {smol_dir}, max_seq_len: 1024}}\n"
                   f"data: {{train: {data}}}\n{body}")
    return job


def test_plan_compute_and_gpu_hours(tmp_path, smol_dir):
    job = _job(tmp_path, smol_dir, "train: {epochs: 2, global_batch_size: 16, micro_batch_size: 2}\n"
                                   "resources: {num_workers: 8, use_gpu: true}\n")
    plan = P.estimate_plan(load_job(job), "job.yaml")
    (part,) = plan.parts
    steps = -(-100 * 2 // 16)  # ceil(200 / 16) = 13
    assert part.flops == 6 * 134_515_008 * steps * 16 * 1024
    assert plan.gpu_hours == pytest.approx(part.flops / (0.4 * 989e12) / 3600)
    assert plan.totals() == {"CPU": 8.0, "GPU": 8.0}
    assert part.fits and plan.fits
    text = P.format_plan(plan)
    assert "8 bundles" in text and "GPU-hours" in text and "fits" in text

    lora = P.estimate_plan(load_job(job, ["adapter.rank=8"]))
    assert lora.parts[0].flops == 4 * 134_515_008 * steps * 16 * 1024


def test_plan_does_not_fit_suggests(tmp_path, smol_dir):
    job = _job(tmp_path, smol_dir, "train: {max_steps: 5, global_batch_size: 64, micro_batch_size: 8}\n"
                                   "resources: {num_workers: 8, use_gpu: true, gpu_memory_gib: 4}\n")
    plan = P.estimate_plan(load_job(job))
    (part,) = plan.parts
    assert not part.fits and not plan.fits
    text = "\n".join(part.suggestions)
    assert "train.micro_batch_size: 1" in text or "train.micro_batch_size: 2" in text
    assert "DOES NOT FIT" in P.format_plan(plan)


def test_plan_finds_engines_anywhere(tmp_path, smol_dir):
    """A kind plan has never heard of: engines are found by type, with the model beside them."""

    class TeacherSection(StrictModel):
        model: ModelConfig = Field(default_factory=ModelConfig)
        engine: EngineConfig = Field(default_factory=EngineConfig)
        sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    class FutureJob(StrictModel):
        kind: str = "future"
        teacher: TeacherSection = Field(default_factory=TeacherSection)

    cfg = FutureJob(teacher=TeacherSection(model=ModelConfig(path=str(smol_dir)),
                                           engine=EngineConfig(num_engines=2, max_model_len=512, max_num_seqs=8,
                                                               kv_cache_gib=1.0),
                                           sampling=SamplingConfig(n=2)))
    plan = P.estimate_plan(cfg)
    (part,) = plan.parts
    assert part.count == 2 and part.bundle == {"CPU": 1.0}
    assert part.memory.weights == 134_515_008 * 4  # engine dtype float32
    assert part.memory.kv_cache == 1024**3
    assert part.flops is None  # no prompt file to count
    assert any("sequence(s) of max_model_len" in n for n in part.notes)


def test_missing_config_json_names_the_field(tmp_path):
    with pytest.raises(P.PlanError, match=r"model.path: .* has no config.json"):
        P.model_shape(str(tmp_path))


def test_cli_plan_prints(tmp_path, smol_dir, capsys):
    from rayapp.cli import main

    job = _job(tmp_path, smol_dir, "train: {max_steps: 3, global_batch_size: 8, micro_batch_size: 4}\n"
                                   "resources: {num_workers: 2}\n")
    assert main(["plan", str(job), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parts"][0]["count"] == 2
    assert out["flops"] == 6 * 134_515_008 * 3 * 8 * 1024


def test_iteration_kinds_count_their_optimizer_steps():
    """kind: rlhf and method: on_policy take update_epochs x samples / global_batch_size steps per
    iteration, which the plan counts (not epochs over the prompt file) and the training loop uses."""
    from rayapp.plan import plan_training

    rl = load_job(ROOT / "jobs/rlhf_grpo.yaml", ["rl.iterations=30", "rl.update_epochs=2"])
    assert rl.planned_steps() == 30 * 2 * (8 * 4) // 16 == 120
    assert "(120 steps)" in plan_training(rl).flops_note
    opd = load_job(ROOT / "jobs/distill_on_policy.yaml", ["on_policy.iterations=30"])
    per_iter = opd.on_policy.update_epochs * 8 * 4 // 16
    assert opd.planned_steps() == 30 * per_iter
    assert f"({30 * per_iter} steps)" in plan_training(opd).flops_note
    sft = load_job(ROOT / "jobs/sft_tiny.yaml")
    assert sft.planned_steps(256) == 10 * 256 // 16 and sft.planned_steps(None) is None
