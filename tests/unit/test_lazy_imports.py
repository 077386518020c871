"""Importing the config, data and algorithm layers loads no ray, vllm or transformers (STYLE.md 7)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

HEAVY = ("ray", "vllm", "transformers")

CODE = """
import importlib, pkgutil, sys
import rayapp.config, rayapp.data, rayapp.algorithms
for package in (rayapp.config, rayapp.data, rayapp.algorithms):
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(package.__name__ + "." + info.name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print("heavy:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_config_data_algorithms_import_light():
    code = f"HEAVY = {HEAVY!r}\n" + CODE
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "heavy: []" in r.stdout


def test_storage_imports_light():
    """rayapp.storage is imported by recipes, deploy and the CLI: pyarrow comes in only when a store is opened."""
    code = (
        "import sys, rayapp.storage\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'vllm', 'transformers', 'torch', 'pyarrow'})\n"
        "print('heavy:', loaded)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "heavy: []" in r.stdout
