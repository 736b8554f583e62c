"""Packaging: operators/ and kernels/ install as pipeline_infer subpackages, never top level."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared() -> tuple[set[str], dict[str, str]]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_folder_is_declared():
    declared, mapping = _declared()
    found = set()
    for name, folder in mapping.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert found == declared, f"missing from pyproject: {found - declared}; stale: {declared - found}"


@pytest.mark.slow
def test_regular_install_has_no_top_level_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), ROOT],
        check=True,
        capture_output=True,
    )
    assert (target / "pipeline_infer" / "kernels" / "attention" / "torch_backend.py").exists()
    assert (target / "pipeline_infer" / "operators" / "__init__.py").exists()
    assert not (target / "kernels").exists() and not (target / "operators").exists()
    code = (
        "import pipeline_infer.kernels.attention.torch_backend, pipeline_infer.operators, importlib.util;"
        "assert importlib.util.find_spec('kernels') is None"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path))


def test_editable_install_maps_subpackages(tmp_path):
    """In a fresh interpreter outside the repository, as a user's script would run."""
    code = (
        "import importlib.util, os, pipeline_infer.kernels.attention.base as b, pipeline_infer.operators;"
        f"assert os.path.realpath(b.__file__).startswith(os.path.realpath({os.path.join(ROOT, 'kernels')!r}));"
        "spec = importlib.util.find_spec('kernels');"
        "assert spec is None or 'site-packages' in (spec.origin or ''), spec"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path))
