"""Every job kind leaves its resolved config beside its outputs: here the kinds that are no training
recipe (dataset, evaluate, and the pipeline itself), in one small pipeline run through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_dataset_evaluate_and_pipeline_write_config_resolved(tmp_path):
    out = tmp_path / "pipe"
    job = {
        "kind": "pipeline", "name": "resolved", "output_dir": str(out),
        "stages": {
            "data": {"kind": "dataset", "dataset": "chain_sum", "sizes": {"train": 4, "unlabeled": 2, "test": 2},
                     "options": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
            "evaluate": {"kind": "evaluate", "data": "${stages.data.output_dir}/test.jsonl", "latency_samples": 0,
                         "models": [{"name": "tiny", "path": "tiny", "max_new_tokens": 2}]},
        },
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(job))
    p = subprocess.run([sys.executable, "-m", "rayapp.cli", "run", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for where, kind in ((out, "pipeline"), (out / "data", "dataset"), (out / "evaluate", "evaluate")):
        resolved = yaml.safe_load((where / "config.resolved.yaml").read_text())
        assert resolved["kind"] == kind and resolved["output_dir"] == str(where)
    assert yaml.safe_load((out / "evaluate" / "config.resolved.yaml").read_text())["task_type"] == "number"  # defaults filled in
