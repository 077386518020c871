"""Job configs: YAML loading, a.b=value overrides, errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayapp.config import ConfigError, dump_config, explain, load_job

ROOT = Path(__file__).resolve().parents[2]
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", JOB_FILES, ids=[p.name for p in JOB_FILES])
def test_every_example_job_validates(path):
    cfg = load_job(path)
    assert cfg.kind
    # The resolved config round-trips: what we save beside the outputs loads back to the same config.
    again = type(cfg).model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_defaults_and_overrides(tmp_path):
    p = _write(tmp_path, "kind: sft\nname: t\ntrain: {epochs: 1, global_batch_size: 8, micro_batch_size: 2}\n")
    cfg = load_job(p, ["train.epochs=3", "adapter.rank=4", "train.learning_rate=2e-4", "data.validation=null"])
    assert cfg.train.epochs == 3
    assert cfg.adapter.rank == 4 and cfg.adapter.lora_alpha == 8
    assert cfg.train.learning_rate == 2e-4
    assert cfg.grad_accum_steps == 2  # 8 / (2 micro x 2 workers)
    assert cfg.resources.num_workers == 2 and cfg.data.on_bad_rows == "error"


def test_unknown_field_names_file_line_and_field(tmp_path):
    p = _write(tmp_path, "kind: sft\nname: t\ntrain:\n  epochs: 1\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    assert f"{p}:5: train.learnin_rate: unknown field" in str(e.value)


def test_wrong_type_and_range(tmp_path):
    p = _write(tmp_path, "kind: sft\ntrain:\n  epochs: lots\n  micro_batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    msg = str(e.value)
    assert f"{p}:3: train.epochs:" in msg and f"{p}:4: train.micro_batch_size:" in msg


def test_cross_field_check_names_both_fields(tmp_path):
    p = _write(tmp_path, "kind: sft\ntrain: {global_batch_size: 10, micro_batch_size: 4}\nresources: {num_workers: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    msg = str(e.value)
    assert "train.global_batch_size (10)" in msg and "train.micro_batch_size (4)" in msg and "resources.num_workers (2)" in msg


def test_precision_resolves_and_refuses_bf16_masters(tmp_path):
    p = _write(tmp_path, "kind: sft\n")
    assert load_job(p).train.resolved_precision(use_gpu=False) == "fp32"
    assert load_job(p, ["resources.use_gpu=true"]).train.resolved_precision(use_gpu=True) == "bf16-mixed"
    assert load_job(p, ["train.precision=bf16-mixed"]).train.resolved_precision(use_gpu=False) == "bf16-mixed"
    # bf16 weights with mixed precision: no float32 masters. Refused, with both ways out.
    for overrides, why in ((["train.precision=bf16-mixed"], "train.precision: bf16-mixed"),
                           (["resources.use_gpu=true"], "train.precision: auto (bf16-mixed because resources.use_gpu")):
        with pytest.raises(ConfigError) as e:
            load_job(p, ["model.dtype=bfloat16", *overrides])
        msg = str(e.value)
        assert "model.dtype: bfloat16" in msg and why in msg
        assert "Set model.dtype: float32" in msg and "train.precision: fp32" in msg
    # Pure bf16 training stays possible when asked for by name.
    cfg = load_job(p, ["model.dtype=bfloat16", "resources.use_gpu=true", "train.precision=fp32"])
    assert cfg.train.resolved_precision(use_gpu=True) == "fp32"


def test_unknown_kind_and_missing_kind(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:1: kind: unknown job kind 'sfy'"):
        load_job(_write(tmp_path, "kind: sfy\n"))
    with pytest.raises(ConfigError, match="kind: required field is missing"):
        load_job(_write(tmp_path, "name: x\n"))


def test_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:2: not valid YAML"):
        load_job(_write(tmp_path, "kind: sft\ntrain: {a: 1: 2}\n"))
    p = _write(tmp_path, "kind: sft\n")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_job(p, ["train.epochs"])
    with pytest.raises(ConfigError, match="override train.epochs"):
        load_job(p, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match="'kind' is a str, not a section"):
        load_job(p, ["kind.x=1"])


def test_explain_lists_fields_with_descriptions():
    text = explain("sft")
    assert "global_batch_size = 16" in text and "Examples per optimizer step" in text
