import subprocess
import sys

from tests.conftest import ROOT

MODULES = ["sft", "step_by_step", "kd", "features", "relations", "preference", "rl", "on_policy"]


def test_algorithms_import_no_heavy_modules():
    code = (
        "import importlib, sys\n"
        "import rayapp.algorithms\n"
        f"for m in {MODULES!r}:\n"
        "    importlib.import_module('rayapp.algorithms.' + m)\n"
        "bad = [m for m in ('ray', 'vllm', 'transformers') if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
