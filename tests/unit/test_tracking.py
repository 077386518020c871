"""Experiment tracking, read back with each library's own reader: TensorBoard's EventAccumulator,
MLflow's search_runs / MlflowClient, and the offline W&B run file (tests/wandb_reader.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError

from rayapp.config.base import REPORT_TO_DESCRIPTION, ReportTo
from rayapp.tracking import Trackers, TrackingError, flatten, replay_metrics, track_job, wandb_mode
from tests.conftest import ROOT
from tests.wandb_reader import read_run

CONFIG = {"kind": "sft", "name": "sft_track", "model": {"path": "tiny", "dtype": "float32"},
          "train": {"learning_rate": 1.0e-4, "global_batch_size": 8}, "adapter": None, "stop": ["\n"]}


def rows(first: int, last: int) -> list[dict]:
    out = []
    for step in range(first, last + 1):
        row = {"step": step, "epoch": step / 4, "loss": 3.0 / step, "lr": 1e-4, "units": 100 + step}
        if step % 4 == 0:
            row["val_loss"] = 2.0 / step
        out.append(row)
    return out


def write_metrics(out: Path, rs: list[dict], mode: str = "w") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rs)


@pytest.fixture
def tracking_env(monkeypatch, tmp_path):
    """No tracking server, no W&B login: MLflow and W&B write into output_dir."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_API_KEY",
                "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "RANK", "WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def tensorboard_scalars(out: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    (text_event,) = acc.Tensors("config/text_summary")
    return scalars, text_event.tensor_proto.string_val[0].decode()


def assert_tensorboard_holds_every_series(out: Path, kind: str) -> None:
    """`report_to: [tensorboard]` at run time: every numeric series of metrics.jsonl is in the event
    files with its steps and values, and the config text names the kind."""
    from rayapp.data.readers import read_jsonl

    scalars, config_text = tensorboard_scalars(out)
    rows = read_jsonl(out / "metrics.jsonl")
    keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert keys, rows[:2]
    for key in sorted(keys):
        expect = [(r["step"], pytest.approx(r[key], rel=1e-5, abs=1e-7)) for r in rows if isinstance(r.get(key), (int, float))]
        assert scalars.get(key) == expect, key
    assert kind in config_text


def mlflow_run(out: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = (out / "mlruns").absolute().as_uri()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["rayapp"], output_format="list")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    client = MlflowClient(tracking_uri=uri)
    return runs[0], client


def wandb_runs(out: Path) -> list[dict]:
    return [read_run(d) for d in sorted((out / "wandb").glob("offline-run-*"))]


def test_every_tracker_holds_every_series_the_config_and_the_report(tmp_path, tracking_env):
    out = tmp_path / "job"
    write_metrics(out, rows(1, 5))
    (out / "report.html").write_text("<html>report</html>")
    with Trackers(["tensorboard", "mlflow", "wandb"], out, "sft_track", CONFIG) as t:
        assert t.sync_metrics() == 5
        assert t.sync_metrics() == 0  # each step once
        t.log_artifact(out / "report.html")

    scalars, config_text = tensorboard_scalars(out)
    assert set(scalars) == {"epoch", "loss", "lr", "units", "val_loss"}
    assert scalars["loss"] == [(s, pytest.approx(3.0 / s)) for s in range(1, 6)]
    assert scalars["val_loss"] == [(4, 0.5)]
    assert "learning_rate: 0.0001" in config_text

    run, client = mlflow_run(out)
    assert run.info.run_name == "sft_track" and run.info.status == "FINISHED"
    assert run.data.params["train.learning_rate"] == "0.0001"
    assert run.data.params["model.path"] == "tiny" and run.data.params["stop"] == '["\\n"]'
    assert run.data.params["adapter"] == "null"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(3.0 / s)) for s in range(1, 6)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.html"]
    assert Path(client.download_artifacts(run.info.run_id, "report.html", str(tmp_path))).read_text() == "<html>report</html>"

    (wb,) = wandb_runs(out)
    assert [h["_step"] for h in wb["history"]] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in wb["history"]] == pytest.approx([3.0 / s for s in range(1, 6)])
    assert wb["history"][3]["val_loss"] == 0.5
    assert wb["config"]["train"] == {"learning_rate": 1.0e-4, "global_batch_size": 8}
    assert wb["artifacts"] == ["sft_track-report.html"] and wb["exit_code"] == 0

    state = json.loads((out / "tracking.json").read_text())
    assert state["last_step"] == {"tensorboard": 5, "mlflow": 5, "wandb": 5} and state["wandb"]["mode"] == "offline"
    assert state["mlflow"]["run_id"] == run.info.run_id


def test_a_rerun_continues_the_same_runs_with_the_steps_after(tmp_path, tracking_env):
    """A job re-run on the same output_dir (resuming from a checkpoint) adds to the same MLflow run,
    TensorBoard directory and W&B run id, without sending a step twice."""
    out = tmp_path / "job"
    write_metrics(out, rows(1, 5))
    with Trackers(["tensorboard", "mlflow", "wandb"], out, "sft_track", CONFIG) as t:
        t.sync_metrics()
    # The re-run resumed from the checkpoint at step 4: metrics.jsonl was cut there and grew again.
    write_metrics(out, rows(1, 4) + rows(5, 8))
    changed = dict(CONFIG, train={"learning_rate": 1.0e-4, "global_batch_size": 8, "max_steps": 8})
    with Trackers(["tensorboard", "mlflow", "wandb"], out, "sft_track", changed) as t:
        assert t.sync_metrics() == 3

    scalars, _ = tensorboard_scalars(out)
    assert [s for s, _ in scalars["loss"]] == list(range(1, 9))
    run, client = mlflow_run(out)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 9))
    assert run.data.params["train.max_steps"] == "8"
    first, second = wandb_runs(out)
    assert first["id"] == second["id"], (first, second)
    assert [h["_step"] for h in first["history"]] == [1, 2, 3, 4, 5]
    assert [h["_step"] for h in second["history"]] == [6, 7, 8]


def test_follow_forwards_rows_while_training_runs(tmp_path, tracking_env):
    out = tmp_path / "job"
    write_metrics(out, [])
    with Trackers(["tensorboard"], out, "sft_track", CONFIG) as t:
        with t.follow(every_s=0.05):
            write_metrics(out, rows(1, 2), mode="a")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rows(3, 3)[0]))  # a row still being written: no newline yet
            deadline = time.monotonic() + 10
            while t.last_step < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert t.last_step == 2  # sent during the block, the half-written row not yet
            with open(out / "metrics.jsonl", "a") as f:
                f.write("\n")
        assert t.last_step == 3  # the rest at the end of the block
    scalars, _ = tensorboard_scalars(out)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]


def test_replay_backfills_a_finished_job(tmp_path, tracking_env):
    import yaml

    out = tmp_path / "job"
    write_metrics(out, rows(1, 4))
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(CONFIG))
    (out / "eval.json").write_text('{"val_loss": 0.5}')
    assert replay_metrics(["mlflow"], out) == 4
    run, client = mlflow_run(out)
    assert run.info.run_name == "sft_track" and run.data.params["train.global_batch_size"] == "8"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["eval.json"]
    assert replay_metrics(["mlflow"], out) == 0  # already there


def test_track_job_wraps_a_recipe(tmp_path, tracking_env):
    """What a recipe does: the config's report_to, metrics followed during the launch, the report
    and eval.json stored at the end; a config without report_to tracks nothing."""
    from rayapp.config.base import StrictModel

    class Job(StrictModel):
        name: str = "sft_track"
        output_dir: str
        report_to: ReportTo = []

    out = tmp_path / "job"
    with track_job(Job(output_dir=str(out), report_to=["mlflow"])):
        write_metrics(out, rows(1, 3))  # the training
        (out / "report.html").write_text("<html/>")  # the ending
        (out / "eval.json").write_text("{}")
    run, client = mlflow_run(out)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["eval.json", "report.html"]
    assert run.data.params["report_to"] == '["mlflow"]' and run.info.status == "FINISHED"
    plain = tmp_path / "plain"
    with track_job(Job(output_dir=str(plain))) as t:
        write_metrics(plain, rows(1, 2))
    assert t.names == () and sorted(p.name for p in plain.iterdir()) == ["metrics.jsonl"]


def test_a_failed_block_marks_the_runs_failed(tmp_path, tracking_env):
    out = tmp_path / "job"
    write_metrics(out, rows(1, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with Trackers(["mlflow"], out, "sft_track", CONFIG) as t:
            t.sync_metrics()
            raise RuntimeError("boom")
    run, _ = mlflow_run(out)
    assert run.info.status == "FAILED"


def test_a_tracker_that_fails_mid_run_is_dropped_and_backfilled_later(tmp_path, tracking_env, monkeypatch, capsys):
    from rayapp import tracking

    out = tmp_path / "job"
    write_metrics(out, rows(1, 2))
    real_log = tracking._MLflow.log

    def server_gone(self, metrics, step):
        if step >= 3:
            raise ConnectionError("mlflow server went away")
        real_log(self, metrics, step)

    monkeypatch.setattr(tracking._MLflow, "log", server_gone)
    with Trackers(["tensorboard", "mlflow"], out, "sft_track", CONFIG) as t:
        assert t.sync_metrics() == 2
        write_metrics(out, rows(3, 5), mode="a")
        assert t.sync_metrics() == 3  # tensorboard got them; mlflow failed at step 3 and was dropped
    err = capsys.readouterr().err
    assert err.count("warning: mlflow: logging step 3 failed (ConnectionError: mlflow server went away)") == 1
    assert f"rayapp track {out} --to mlflow" in err
    assert json.loads((out / "tracking.json").read_text())["last_step"] == {"tensorboard": 5, "mlflow": 2}
    # The server is back: the backfill sends mlflow the steps it missed, into the same run.
    monkeypatch.setattr(tracking._MLflow, "log", real_log)
    assert replay_metrics(["mlflow"], out, artifacts=()) == 3
    run, client = mlflow_run(out)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]


def test_a_tracker_that_cannot_start_fails_before_training(tmp_path, tracking_env, monkeypatch):
    from rayapp import tracking

    def refuse(self, *args):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    monkeypatch.setattr(tracking._MLflow, "__init__", refuse)
    with pytest.raises(TrackingError, match=r"report_to: mlflow: could not start a run \(ConnectionRefusedError: "
                                            r"\[Errno 111\] Connection refused\); check MLFLOW_TRACKING_URI"):
        Trackers(["tensorboard", "mlflow"], tmp_path / "job", "x", CONFIG)


def test_missing_library_is_named(tmp_path, tracking_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingError) as e:
        Trackers(["tensorboard", "wandb"], tmp_path / "job", "x", CONFIG)
    assert "needs wandb, which is not installed" in str(e.value) and "pip install 'rayapp[track]'" in str(e.value)
    assert not (tmp_path / "job" / "tensorboard").exists()  # nothing half-opened


def test_only_rank_zero_tracks(tmp_path, tracking_env, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "job"
    write_metrics(out, rows(1, 2))
    with Trackers(["tensorboard", "mlflow"], out, "x", CONFIG) as t:
        assert t.sync_metrics() == 0
        assert not t.log({"loss": 1.0}, 3)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_wandb_mode(tmp_path, tracking_env, monkeypatch):
    assert wandb_mode() == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode() == "online"  # `wandb login` wrote the key
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.internal")
    assert wandb_mode() == "offline"  # logged in elsewhere, not to this server
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_report_to_field():
    class Job(BaseModel):
        report_to: ReportTo = Field(default_factory=list, description=REPORT_TO_DESCRIPTION)

    assert Job().report_to == []
    assert Job(report_to="mlflow").report_to == ["mlflow"]
    assert Job(report_to="none").report_to == []
    assert Job(report_to=["wandb", "tensorboard", "wandb"]).report_to == ["wandb", "tensorboard"]
    with pytest.raises(ValidationError, match="'tensorboard', 'mlflow' or 'wandb'"):
        Job(report_to=["comet"])


def test_every_training_kind_takes_report_to(tmp_path):
    from rayapp.config import load_job
    from rayapp.config.training import TrainingJobConfig
    from rayapp.kinds import KINDS, config_class

    training = [k for k in KINDS if issubclass(config_class(k), TrainingJobConfig)]
    assert set(training) >= {"sft", "distill", "reward_model", "rlhf", "dpo"}
    cfg = load_job(ROOT / "jobs/sft_tiny.yaml", ["report_to=[mlflow, tensorboard]", f"output_dir={tmp_path}"])
    assert cfg.report_to == ["mlflow", "tensorboard"]
    with pytest.raises(Exception, match="report_to.*needs output_dir on a local path or a shared mount"):
        load_job(ROOT / "jobs/sft_tiny.yaml", ["report_to=mlflow", "output_dir=s3://bucket/run"])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}, "f": None}) == {"a.b": 1, "a.c.d": [1], "e": {}, "f": None}


def test_tracking_imports_light():
    code = (
        "import sys, rayapp.tracking\n"
        "heavy = {'mlflow', 'wandb', 'tensorboardX', 'tensorboard', 'torch', 'ray', 'yaml'}\n"
        "print('heavy:', sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "heavy: []" in r.stdout, r.stdout + r.stderr


def test_rayapp_track_backfills_from_the_command_line(tmp_path, tracking_env):
    out = tmp_path / "job"
    write_metrics(out, rows(1, 3))
    r = subprocess.run([sys.executable, "-m", "rayapp.cli", "track", str(out), "--to", "tensorboard", "--name", "n"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{out}: 3 new metrics rows sent to tensorboard"
    scalars, _ = tensorboard_scalars(out)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    r = subprocess.run([sys.executable, "-m", "rayapp.cli", "track", str(tmp_path), "--to", "mlflow"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path}: no metrics.jsonl here; give the output_dir of a training job"


def test_only_rank_zero_of_a_process_group_tracks(tmp_path, tracking_env):
    """Inside a torch.distributed group (Ray Train workers), ranks other than 0 get a no-op."""
    code = """
import os, sys, torch.distributed as dist
from rayapp.tracking import Trackers
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=2)
t = Trackers(["tensorboard"], os.path.join(sys.argv[2], str(rank)), "x", {})
print(rank, t.names)
t.close()
dist.destroy_process_group()
"""
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(tmp_path), str(store)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy())
             for r in (0, 1)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["0 ('tensorboard',)", "1 ()"], outs
    assert (tmp_path / "0" / "tensorboard").is_dir() and not (tmp_path / "1").exists()
