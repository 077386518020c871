"""bench/gpu_train_step.py runs rayapp's own step loop on CPU (2 steps of a 2-layer model of SmolLM2's
width, FSDP2 at world size 1, bf16-mixed, activation checkpointing) and loads nothing but torch,
transformers and rayapp's torch-only training modules (no ray, vllm, peft or pydantic), so it can run
on a GPU machine that has neither ray nor vllm."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ROOT

CODE = """
import runpy, sys
sys.argv = ["bench/gpu_train_step.py", *{args!r}]
runpy.run_path("bench/gpu_train_step.py", run_name="__main__")
print("heavy:", sorted({{m.split(".")[0] for m in sys.modules}} & {{"ray", "vllm", "peft", "pydantic", "pyarrow"}}))
print("rayapp:", sorted(m for m in sys.modules if m.startswith("rayapp")))
"""


def load_bench():
    """bench/gpu_train_step.py as a module (registered first: its dataclass looks itself up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train_step", ROOT / "bench" / "gpu_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def test_gpu_train_step_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_train_step.json"
    args = ["--device", "cpu", "--steps", "2", "--seq-len", "16", "--batch", "1", "--models", "smollm2-135m",
            "--layers", "2", "--out", str(out)]
    r = subprocess.run([sys.executable, "-c", CODE.format(args=args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "heavy: []" in r.stdout
    rayapp_modules = eval(next(line for line in r.stdout.splitlines() if line.startswith("rayapp:")).split(":", 1)[1])
    assert rayapp_modules == ["rayapp", "rayapp.algorithms", "rayapp.algorithms.sft", "rayapp.fileio", "rayapp.training",
                              "rayapp.training.checkpoint", "rayapp.training.loop", "rayapp.training.parallel"]
    assert "process group 'gloo' (world size 1)" in r.stdout
    row_line = next(line for line in r.stdout.splitlines() if line.startswith("smollm2-135m[L=2]"))
    assert "bf16-mixed on" in row_line and "1 x 16" in row_line

    result = json.loads(out.read_text())
    assert result["backend"] == "gloo" and result["world_size"] == 1
    assert result["ratio"] is None and result["target"] == 0.40  # MFU is measured on CUDA only
    (row,) = result["rows"]
    # 49152*576 tied embeddings + 2 layers of 3,540,096 + the final norm (SmolLM2's shapes)
    assert row["params"] == 49152 * 576 + 2 * 3_540_096 + 576
    assert row["strategy"] == "fsdp" and row["precision"] == "bf16-mixed" and row["activation_checkpointing"]
    assert row["loop"] == "rayapp.training.loop.fit"
    assert row["param_dtypes"] == ["torch.float32"]  # float32 masters
    assert row["timed_steps"] == 1 and row["tokens_per_s"] > 0 and row["mfu"] is None
    assert len(row["losses"]) == 2 and all(math.isfinite(x) for x in row["losses"])
    assert abs(row["losses"][0] - math.log(49152)) < 0.5  # random init predicts about uniformly
    assert all(n > 0 for n in row["grad_norms"])


def test_step_config_has_what_the_loop_reads():
    """The bench's pydantic-free StepConfig carries every TrainConfig field the loop reads, under the same names."""
    from rayapp.config.base import TrainConfig

    bench = load_bench()
    fields = set(bench.StepConfig.__dataclass_fields__)
    assert fields <= set(TrainConfig.model_fields)
    loop_src = (ROOT / "rayapp" / "training" / "loop.py").read_text()
    import re

    read = set(re.findall(r"cfg\.([a-z_]+)", loop_src)) - {"peak_lr"}
    assert read <= fields, read - fields
    assert bench.StepConfig(global_batch_size=4, max_steps=2).peak_lr == 1e-4


def test_bench_models_have_the_published_sizes():
    """Built on the meta device (no memory): 134,515,008 and 494,032,768 parameters, the model cards' 135M / 0.49B."""
    import torch

    bench = load_bench()
    sizes = {}
    for name in bench.MODELS:
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in bench.build(name, 0).parameters())
    assert sizes == {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768}
