"""``rayapp deploy MODEL_DIR [--adapter NAME=DIR ...]``, ``rayapp deploy --status``, ``rayapp deploy --shutdown [NAME]``."""

from __future__ import annotations

import json

from rayapp.serving.errors import DeployError


def _parse_adapters(items: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DeployError(f"--adapter '{item}': expected NAME=DIR, e.g. --adapter support=outputs/sft_tiny/adapter")
        adapters[name] = path
    return adapters


def _cmd_deploy(args) -> int:
    from pydantic import ValidationError

    from rayapp.config.base import DeployConfig
    from rayapp.serving import deploy as dep

    if args.status:
        rows = dep.status()
        if not rows:
            print("nothing deployed (no Serve application on RAY_ADDRESS or the local rayapp head)")
        for row in rows:
            replicas = "; ".join(f"{d}: {json.dumps(r)}" for d, r in row["replicas"].items())
            print(f"{row['name']}  {row['state']}  {row['url']}  model={row['name']}  replicas[{replicas}]")
            if row["message"]:
                print(f"  {row['message']}")
        return 0
    if args.shutdown:
        name = args.model if args.model else None
        removed = dep.shutdown(name)
        print("removed: " + (", ".join(removed) if removed else "nothing (no deployments found)"))
        return 0
    if not args.model:
        raise DeployError("rayapp deploy: give a MODEL_DIR (or a job's output_dir), or --status / --shutdown")
    fields = {"enabled": True, "port": args.port, "host": args.host, "min_replicas": args.min_replicas,
              "max_replicas": max(args.max_replicas, args.min_replicas), "blocking": args.blocking,
              "max_model_len": args.max_model_len, "use_gpu": args.gpu,
              "tensor_parallel_size": args.tensor_parallel_size, "api_key_env": args.api_key_env,
              "api_key_file": args.api_key_file, "allow_unauthenticated": args.allow_unauthenticated}
    try:
        deploy = DeployConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise DeployError("rayapp deploy: " + "; ".join(err["msg"].removeprefix("Value error, ")
                                                       for err in e.errors())) from None
    name = args.name or _default_name(args.model)
    if args.reward:
        info = dep.deploy_reward_model(args.model, deploy, name)
    else:
        info = dep.deploy_model(args.model, _parse_adapters(args.adapter), deploy, name)
    print(f"serving model '{info.model_name}' at {info.url}")
    for adapter in info.adapters:
        print(f"  adapter '{adapter}': send model='{adapter}'")
    if info.api_key_required:
        print("  requests need `Authorization: Bearer <key>`")
    print("stop with: rayapp deploy --shutdown " + info.model_name)
    return 0


def _default_name(model: str) -> str:
    from pathlib import Path

    path = Path(model)
    if path.name in ("model", "adapter") and path.parent.name:
        return path.parent.name
    return path.name or "model"


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="serve a model (and LoRA adapters) behind an OpenAI-compatible endpoint")
    p.add_argument("model", nargs="?", help="model directory, built-in name, or a job's output_dir "
                   "(with --shutdown: the deployment to remove; default all)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="a LoRA adapter served on the same base")
    p.add_argument("--name", help="model name clients send (default: the directory's name)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1)
    p.add_argument("--max-model-len", type=int, help="engine context length (default: the model's)")
    p.add_argument("--gpu", action="store_true", default=None, help="serve on GPUs (default: vLLM CPU build)")
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--api-key-env", help="environment variable holding the API key")
    p.add_argument("--api-key-file", help="file holding the API key")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="serve on a non-loopback --host without an API key (anyone who reaches the port may call it)")
    p.add_argument("--reward", action="store_true", help="serve a reward model on /v1/score")
    p.add_argument("--blocking", action="store_true", default=None, help="stay in the foreground until Ctrl-C")
    p.add_argument("--status", action="store_true", help="list deployments: name, state, URL, replicas")
    p.add_argument("--shutdown", action="store_true", help="remove deployments (and the local head rayapp started)")
    p.set_defaults(func=_cmd_deploy)
