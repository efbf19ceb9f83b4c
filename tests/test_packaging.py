"""Packaging: the version is written once, .safetensors reading is in the base install, and
recipe-only code stays out of the package (checked on a wheel built from this tree)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import hf_tempbalance
from hf_tempbalance.cli import main

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_version_is_written_in_one_place():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hf_tempbalance.__version__"}
    literal = re.compile(r"""version_*\s*[=:]\s*["']\d""", re.I)
    writers = [str(p.relative_to(ROOT)) for p in [ROOT / "pyproject.toml", *ROOT.glob("hf_tempbalance/**/*.py")]
               if literal.search(p.read_text(encoding="utf-8"))]
    assert writers == ["hf_tempbalance/__init__.py"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", hf_tempbalance.__version__)


def test_safetensors_is_a_base_dependency():
    base = PYPROJECT["project"]["dependencies"]
    assert any(re.match(r"safetensors\b", d) for d in base)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(re.match(r"safetensors\b", d) for deps in extras.values() for d in deps)


def test_safetensors_analysis_needs_no_extra(tmp_path, capsys, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    for extra in ("matplotlib", "pandas", "timm", "transformers"):  # none of the extras importable
        monkeypatch.setitem(sys.modules, extra, None)
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    safetensors_torch.save_file({"fc.weight": weight}, tmp_path / "w.safetensors")
    assert main(["analyze", str(tmp_path / "w.safetensors"), "--arch", "tensors", "--device", "cpu",
                 "--no-progress"]) == 0
    assert "fc  " in capsys.readouterr().out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of this tree by setuptools (no network, no build isolation)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hf_tempbalance", src / "hf_tempbalance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1])


def test_wheel_metadata_and_contents(wheel):
    names = wheel.namelist()
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {hf_tempbalance.__version__}\n" in meta
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, flags=re.M)
    assert "safetensors>=0.4" in requires  # unconditional: no `; extra == ...` marker
    assert not any(r.startswith("safetensors") and "extra" in r for r in requires)
    entry = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "hf-tempbalance = hf_tempbalance.cli:main" in entry
    packaged = {n for n in names if not n.startswith(tuple(
        p for p in {n.split("/")[0] + "/" for n in names} if p.endswith(".dist-info/")))}
    assert "hf_tempbalance/py.typed" in packaged and "hf_tempbalance/cli.py" in packaged
    # recipe-only code (the `evaluate` accuracy copy) lives under recipes/, not in the package
    assert not [n for n in packaged if n.startswith("hf_tempbalance/metrics/")]
    assert all(n.startswith("hf_tempbalance/") for n in packaged)
