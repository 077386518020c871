"""Serve a reward model on ``/v1/score`` (see :mod:`rayapp.serving.reward_server` for the API)."""

from __future__ import annotations

import logging
import os
import time

from rayapp.config.base import DeployConfig
from rayapp.serving.deploy import DeployInfo, connect, start_serve
from rayapp.serving.errors import DeployError

log = logging.getLogger(__name__)


def deploy_reward_model(model_dir: str, deploy: DeployConfig, name: str) -> DeployInfo:
    """Serve the ``*ForSequenceClassification`` model in ``model_dir`` as ``name``; return where it answers."""
    from pathlib import Path

    from ray import serve

    from rayapp.models.io import resolve_model
    from rayapp.serving.app import key_digest, read_api_key

    path = Path(model_dir)
    base = path / "model" if (path / "model" / "config.json").exists() else resolve_model(str(model_dir))
    api_key = read_api_key(deploy)
    connect()
    port = start_serve(deploy)
    from rayapp.serving.reward_server import build_reward_deployment

    # The key's digest, never the key, travels with the app.
    RewardModelDeployment = build_reward_deployment(key_digest(api_key) if api_key else None)
    started = time.time()
    deployment = RewardModelDeployment.options(
        autoscaling_config={"min_replicas": deploy.min_replicas, "initial_replicas": max(1, deploy.min_replicas),
                            "max_replicas": deploy.max_replicas,
                            "target_ongoing_requests": deploy.target_ongoing_requests},
    )
    try:
        serve.run(deployment.bind(str(base), name, deploy.max_model_len or 512), name=name,
                  route_prefix=deploy.route_prefix, blocking=False)
    except RuntimeError as e:
        raise DeployError(f"deploying reward model '{name}' from {base} failed: {str(e)[-1500:]}\n"
                          "is it a *ForSequenceClassification directory (a reward_model job's output)?") from e
    prefix = deploy.route_prefix.rstrip("/")
    info = DeployInfo(url=f"http://{deploy.host}:{port}{prefix}/v1", model_name=name, app_name=name,
                      ray_address=os.environ.get("RAY_ADDRESS", "in-process"),
                      api_key_required=api_key is not None, kind="reward")
    log.info("serving reward model %s at %s/score (ready in %.0f s)", name, info.url, time.time() - started)
    return info
