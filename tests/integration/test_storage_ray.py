"""Ray Train writes checkpoints to s3:// through rayapp.storage's filesystem, and a second fit
with the same run name resumes from them (how the recipes resume)."""

from __future__ import annotations

import pytest

from rayapp.storage import open_output

pytestmark = pytest.mark.integration


def test_train_checkpoints_to_s3_and_resumes(ray_cluster, s3_server, s3_bucket):
    # Run alone, ray_cluster starts before s3_server sets AWS_ENDPOINT_URL_S3, so the Train
    # controller and workers lack it: the endpoint reaches them inside the pickled filesystem.
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = open_output(f"s3://{s3_bucket}/x")

    # Defined here so that cloudpickle sends it by value (workers cannot import this test module).
    def _train_one_step(config):
        """Resume from the latest checkpoint if there is one, then report one more."""
        import json
        import os
        import tempfile

        import ray.train

        ckpt = ray.train.get_checkpoint()
        start = 0
        if ckpt is not None:
            with ckpt.as_directory() as d, open(os.path.join(d, "state.json")) as f:
                start = json.load(f)["step"]
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"step": start + 1}, f)
            ray.train.report(
                {"step": start + 1, "resumed_from": start},
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=f"step_{start + 1:06d}",
            )

    def fit():
        return TorchTrainer(
            _train_one_step,
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="checkpoints", **store.run_config_kwargs()),
        ).fit()

    first = fit()
    assert first.metrics["step"] == 1 and first.metrics["resumed_from"] == 0
    keys = s3_server.keys(s3_bucket, "x/")
    assert "x/checkpoints/step_000001/state.json" in keys, keys
    assert first.checkpoint.path == f"{s3_bucket}/x/checkpoints/step_000001"

    second = fit()
    assert second.metrics["resumed_from"] == 1 and second.metrics["step"] == 2
    assert "x/checkpoints/step_000002/state.json" in s3_server.keys(s3_bucket, "x/")
    assert store.read_json("checkpoints/step_000002/state.json") == {"step": 2}
