"""`rayapp plan --mfu/--peak-tflops/--usd-per-gpu-hour` and the suggestions when a job does not fit
(LoRA, FSDP, more tensor parallelism), each with the estimate it promises."""

from __future__ import annotations

import json
import re

import pytest

from rayapp import plan as P
from rayapp.cli import main
from rayapp.config import load_job
from tests.unit.test_plan import SMOLLM2, SMOLLM2_PARAMS

# Llama-2-70B's published config.json: 69B parameters, 138 GB in bf16 (more than one 80 GiB GPU).
LLAMA70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def _model(tmp_path, name, config):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def _sft_job(tmp_path, model_dir, body: str, rows: int = 100, seq: int = 1024):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input_text": f"q{i}", "output_text": "a"}) + "\n" for i in range(rows)))
    job = tmp_path / "job.yaml"
    job.write_text(f"kind: sft\nmodel: {{path: {model_dir}, max_seq_len: {seq}}}\ndata: {{train: {data}}}\n{body}")
    return job


@pytest.fixture
def job(tmp_path):
    # 100 rows, 2 epochs, global batch 16: 13 steps of 16 x 1024 tokens, full tuning: 6 x P x T FLOPs
    return _sft_job(tmp_path, _model(tmp_path, "smollm2", SMOLLM2),
                    "train: {epochs: 2, global_batch_size: 16, micro_batch_size: 2}\n"
                    "resources: {num_workers: 8, use_gpu: true}\n")


FLOPS = 6 * SMOLLM2_PARAMS * 13 * 16 * 1024


def _json_plan(capsys, job, *flags) -> dict:
    assert main(["plan", str(job), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_gpu_hours_scale_inversely_with_mfu_and_peak(job, capsys):
    default = _json_plan(capsys, job)
    assert default["flops"] == FLOPS
    assert default["gpu_hours"] == pytest.approx(FLOPS / (0.4 * 989e12) / 3600)
    assert (default["mfu"], default["peak_tflops"], default["usd"]) == (0.4, 989.0, None)

    half_mfu = _json_plan(capsys, job, "--mfu", "0.2")
    assert half_mfu["flops"] == FLOPS  # the work is the same, only the time to do it changes
    assert half_mfu["gpu_hours"] == pytest.approx(2 * default["gpu_hours"])
    a100 = _json_plan(capsys, job, "--peak-tflops", "312")
    assert a100["gpu_hours"] == pytest.approx(default["gpu_hours"] * 989 / 312)
    both = _json_plan(capsys, job, "--mfu", "0.5", "--peak-tflops", "100")
    assert both["gpu_hours"] == pytest.approx(FLOPS / (0.5 * 100e12) / 3600)


def test_cost_is_gpu_hours_times_the_price(job, capsys):
    priced = _json_plan(capsys, job, "--mfu", "0.25", "--peak-tflops", "400", "--usd-per-gpu-hour", "2.5")
    hours = FLOPS / (0.25 * 400e12) / 3600
    assert priced["gpu_hours"] == pytest.approx(hours)
    assert priced["usd_per_gpu_hour"] == 2.5 and priced["usd"] == pytest.approx(2.5 * hours)

    # The printed line says the same numbers, with the peak the user gave (not labelled an H100's).
    assert main(["plan", str(job), "--mfu", "0.25", "--peak-tflops", "400", "--usd-per-gpu-hour", "2.5"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "GPU-hours" in ln)
    m = re.search(r"= ([0-9.e+-]+) GPU-hours at 25% MFU of 400 TFLOP/s(.*), \$([0-9,.]+) at \$2.5/GPU-hour", line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(hours, rel=1e-2)  # printed to 3 significant digits
    assert "H100" not in m.group(2)
    assert float(m.group(3).replace(",", "")) == pytest.approx(2.5 * hours, abs=0.005)
    # Without a price no cost is printed; the default peak is named as the H100's.
    assert main(["plan", str(job)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "GPU-hours" in ln)
    assert "40% MFU of 989 TFLOP/s (H100 bf16 dense)" in line and "$" not in line


@pytest.mark.parametrize("flag, value", [("--mfu", "0"), ("--mfu", "40"), ("--peak-tflops", "0"),
                                         ("--usd-per-gpu-hour", "-1")])
def test_out_of_range_flags_are_refused(job, capsys, flag, value):
    assert main(["plan", str(job), flag, value]) == 1
    assert f"error: {flag} {value}" in capsys.readouterr().err


def _gib_in(text: str) -> float:
    m = re.search(r": ([0-9.]+) (GiB|MiB) per (worker|device)", text)
    assert m, text
    return float(m.group(1)) * (1 if m.group(2) == "GiB" else 1 / 1024)


def test_lora_and_fsdp_suggested_with_their_estimates(tmp_path):
    """Full tuning of SmolLM2 on 8 DDP workers of 2 GiB does not fit: plan offers LoRA and FSDP, each
    with the per-worker estimate of that change, and says which fit."""
    smol = _model(tmp_path, "smollm2", SMOLLM2)
    job = _sft_job(tmp_path, smol, "train: {max_steps: 5, global_batch_size: 8, micro_batch_size: 1}\n"
                                   "resources: {num_workers: 8, use_gpu: true, gpu_memory_gib: 2}\n", seq=128)
    cfg = load_job(job)
    (part,) = P.estimate_plan(cfg).parts
    assert not part.fits
    shape = P.model_shape(str(smol))
    precision = cfg.train.resolved_precision(True)

    def mem(**kw):
        args = dict(dtype="float32", micro_batch=1, seq_len=128, num_workers=8, strategy="ddp", precision=precision)
        return P.training_memory(shape, **{**args, **kw}).total

    lora = next(s for s in part.suggestions if s.startswith("LoRA (adapter: {rank: 8})"))
    fsdp = next(s for s in part.suggestions if s.startswith("resources.strategy: fsdp over 8 workers"))
    assert _gib_in(lora) == pytest.approx(mem(lora_params=shape.lora_params(8)) / P.GIB, abs=0.006)
    assert _gib_in(fsdp) == pytest.approx(mem(strategy="fsdp") / P.GIB, abs=0.006)
    budget = P.USABLE_FRACTION * 2 * P.GIB
    for text, estimate in ((lora, mem(lora_params=shape.lora_params(8))), (fsdp, mem(strategy="fsdp"))):
        assert estimate < part.memory.total
        assert text.endswith(" - fits") == (estimate <= budget)
    assert any(s.endswith(" - fits") for s in (lora, fsdp))  # 2 GiB holds one of them

    # What the job already does is not suggested again.
    (done,) = P.estimate_plan(load_job(job, ["adapter.rank=8", "resources.strategy=fsdp"])).parts
    assert not any(s.startswith(("LoRA", "resources.strategy")) for s in done.suggestions)


def test_engine_too_big_for_one_gpu_suggests_the_tensor_parallelism_that_fits(tmp_path):
    """A 70B bf16 engine on one 80 GiB GPU has no room for a KV cache: plan names the smallest
    tensor_parallel_size whose share of the weights leaves a cache, with that estimate."""
    from rayapp.config.base import EngineConfig

    big = _model(tmp_path, "llama70b", LLAMA70B)
    shape = P.model_shape(str(big))
    assert 68e9 < shape.params < 70e9
    engine = EngineConfig(use_gpu=True, dtype="bfloat16", max_model_len=4096, max_num_seqs=64)
    part = P.plan_engine(engine, str(big), "teacher", rows=None)
    assert any("about 0 sequence(s)" in n for n in part.notes)
    # 2 GPUs: half the weights each, under the 0.85 x 80 GiB vLLM takes; what is left is the cache.
    weights2 = shape.params * 2 / 2
    cache2 = 0.85 * 80 * P.GIB - weights2
    seqs2 = int(cache2 // (shape.kv_bytes_per_token(2) * 4096 / 2))
    assert seqs2 >= 1
    tp = next(s for s in part.suggestions if s.startswith("engine.tensor_parallel_size:"))
    assert tp.startswith("engine.tensor_parallel_size: 2:") and tp.endswith(" - fits")
    assert f"about {seqs2} sequence(s)" in tp
    assert _gib_in(tp) == pytest.approx((weights2 + min(cache2, shape.kv_bytes_per_token(2) * 64 * 4096 / 2)) / P.GIB,
                                        abs=0.006)
    # At tp=2 already it fits: no tensor parallelism suggested; a model that fits no node of 8 gets only the general advice.
    at2 = P.plan_engine(engine.model_copy(update={"tensor_parallel_size": 2}), str(big), "t", None)
    assert at2.fits and not any("tensor_parallel_size" in s for s in at2.suggestions)
    huge = _model(tmp_path, "huge", {**LLAMA70B, "num_hidden_layers": 1000})
    (advice,) = P.plan_engine(engine, str(huge), "t", None).suggestions
    assert advice.startswith("raise engine.tensor_parallel_size")
