"""Every command in the fenced blocks of README.md and docs/*.md works as written.

Each command line found there must be listed below: in RUNS (run here, in the repository root,
and expected to exit 0 and print the given text) or in SKIPPED, with why it cannot run here
(it trains, deploys, installs or needs a cluster). A command in neither fails the test, so a
new or edited command in the docs is checked or explicitly excused. Skipped ``rayapp`` commands
are still parsed by rayapp's own argument parser (a renamed subcommand or flag fails), and
skipped ``make`` targets must exist (``make -n``).

A line such as ``rayapp jobs list | status ID | logs ID --follow`` is a synopsis of several
commands: each alternative is checked with the words before the first one (``rayapp jobs``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# command as written (comment stripped) -> text its output must contain
RUNS = {
    "rayapp validate jobs/sft_tiny.yaml": "config ok (kind: sft)",
    "rayapp validate --explain sft": "global_batch_size = 16",
    "rayapp plan jobs/sft_smollm2_lora.yaml": "verdict: fits",
    "rayapp plan jobs/sft_smollm2_lora.yaml resources.use_gpu=true resources.num_workers=8 train.global_batch_size=16":
        "8 x {'CPU': 1.0, 'GPU': 1.0}",
}

TRAINS = "trains a model (seconds to minutes on 2 cores; tests/e2e/test_cli_sft.py and tests/integration run jobs)"
SKIPPED = {
    "make demo": "installs and runs the whole demo (tests/e2e/test_demo.py)",
    "make test": "installs and runs the whole test suite (this test is part of it)",
    "rayapp run jobs/sft_tiny.yaml train.epochs=2": TRAINS,
    "rayapp run jobs/sft_smollm2_lora.yaml": TRAINS,
    "rayapp run jobs/sft_tiny.yaml": TRAINS,
    "rayapp run jobs/distill_step_by_step.yaml": TRAINS,
    "rayapp run jobs/distill_logits.yaml": TRAINS,
    "rayapp run jobs/distill_features.yaml": TRAINS,
    "rayapp run jobs/distill_relations.yaml": TRAINS,
    "rayapp run jobs/distill_self.yaml": TRAINS,
    "rayapp run jobs/distill_on_policy.yaml": TRAINS,
    "rayapp deploy outputs/sft_tiny/model": "deploys a model on Ray Serve (tests/e2e/test_deploy.py)",
    "rayapp deploy BASE_DIR --adapter support=outputs/x/adapter": "deploys; BASE_DIR is a placeholder",
    "rayapp track outputs/sft_tiny --to tensorboard mlflow": "needs a finished job's outputs (tests/unit/test_tracking.py)",
    "ray up cluster.yaml": "starts a cloud cluster (tests/unit/test_cluster_yaml.py validates the file)",
    "ray dashboard cluster.yaml": "needs the cluster `ray up` started",
    "ray down cluster.yaml": "needs the cluster `ray up` started",
    "rayapp submit jobs/demo.yaml --address http://HEAD:8265": "needs a cluster (tests/integration/test_jobs.py)",
    "rayapp submit jobs/distill_step_by_step.yaml --address http://localhost:8265":
        "needs a cluster (tests/integration/test_jobs.py)",
    "rayapp jobs list | status ID | logs ID --follow | stop ID": "needs a cluster and a job id (tests/integration/test_jobs.py)",
}


def fenced_commands(path: Path) -> list[str]:
    """Command lines of the fenced blocks of a markdown file, comments stripped. Blocks tagged with a
    language other than sh/bash/shell/console (yaml, json, a table) hold no commands."""
    commands, in_block, shell = [], False, False
    for line in path.read_text().splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            in_block, shell = not in_block, fence.group(1) in ("", "sh", "bash", "shell", "console")
            continue
        if in_block and shell:
            text = re.sub(r"\s+#.*$", "", line.strip().removeprefix("$ ")).strip()
            if text and not text.startswith("#"):
                commands.append(" ".join(text.split()))
    return commands


def documented() -> list[tuple[str, str]]:
    return [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in fenced_commands(path)]


def alternatives(command: str) -> list[list[str]]:
    """'rayapp jobs list | status ID' -> [['rayapp', 'jobs', 'list'], ['rayapp', 'jobs', 'status', 'ID']]."""
    first, *rest = [shlex.split(part) for part in command.split(" | ")]
    if not rest:
        return [first]
    prefix = first[:2] if first[0] == "rayapp" else first[:1]
    return [first] + [prefix + words for words in rest]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e["HF_HUB_OFFLINE"] = "1"
    return e


def test_every_documented_command_is_run_or_excused():
    cmds = documented()
    assert len(cmds) >= 15, cmds  # the extraction found the blocks
    unknown = [f"{where}: {cmd}" for where, cmd in cmds if cmd not in RUNS and cmd not in SKIPPED]
    assert not unknown, "commands in the docs that this test neither runs nor excuses (add them to RUNS or SKIPPED):\n" + "\n".join(unknown)
    stale = [cmd for cmd in (*RUNS, *SKIPPED) if cmd not in {c for _, c in cmds}]
    assert not stale, f"listed here but no longer in the docs: {stale}"


@pytest.mark.parametrize("where, command", [c for c in documented() if c[1] in RUNS], ids=lambda v: v)
def test_documented_command_runs(where, command):
    argv = shlex.split(command)
    assert argv[0] == "rayapp"
    p = subprocess.run([sys.executable, "-m", "rayapp.cli", *argv[1:]], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"{where}: `{command}` exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert RUNS[command] in p.stdout, f"{where}: `{command}` did not print {RUNS[command]!r}:\n{p.stdout[-3000:]}"


@pytest.mark.parametrize("where, command", [c for c in documented() if c[1] in SKIPPED], ids=lambda v: v)
def test_skipped_command_still_parses(where, command):
    from rayapp.cli import build_parser

    for argv in alternatives(command):
        if argv[0] == "rayapp":
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as e:
                pytest.fail(f"{where}: `{' '.join(argv)}` is not a valid rayapp command line (argparse exit {e.code})")
        elif argv[0] == "make":
            targets = [a for a in argv[1:] if "=" not in a]
            p = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and "No rule to make target" not in p.stderr, f"{where}: make {targets}: {p.stderr}"
        else:
            assert argv[0] == "ray", f"{where}: {command}: no check for `{argv[0]}` commands"
