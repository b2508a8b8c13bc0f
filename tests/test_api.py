"""The top-level API: `from deeperfly_nb import Config, PoseResult, triangulate, ...` works, lazily."""
import subprocess, sys
import deeperfly_nb

def test_every_name_resolves_to_its_module():
    import importlib
    for name, module in deeperfly_nb._API.items():
        assert getattr(deeperfly_nb, name) is getattr(importlib.import_module(f"deeperfly_nb.{module}"), name), name

def test_importing_the_package_imports_nothing_heavy():
    code = "import sys, deeperfly_nb; from deeperfly_nb import Config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
