"""Installed, the project claims one import namespace: ``distillery.*``.

The folders at the root stay the architecture (teachers/, students/, registry/, flows/, demo/),
and pyproject.toml maps them under ``distillery`` (setuptools' package-dir); the distribution's
name is one PyPI does not give another project. Built here as pip builds it for a user.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_one_namespace_the_demo_assets_and_the_console_script(tmp_path):
    had_build = (ROOT / "build").exists()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if not had_build:  # setuptools builds in the checkout's build/: leave the checkout as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("*.whl"))
    assert wheel.name.startswith("pipeline_distillery-")  # "distillery" on PyPI is another project
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"distillery", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("distillery/teachers/graph.py", "distillery/teachers/nodes/yolo.py",
                   "distillery/students/model/heads/llm.py", "distillery/students/serving/predictor.py",
                   "distillery/registry/pyfunc_model.py", "distillery/flows/distill.py", "distillery/cli.py",
                   "distillery/rle.py", "distillery/demo/assets/SHA256SUMS", "distillery/demo/assets/llm/model.safetensors"):
        assert module in names, module
    assert not any(n.startswith(("benchmarks/", "tests/")) for n in names)
    folders = {"distillery": "distillery", "teachers": "distillery/teachers", "students": "distillery/students",
               "registry": "distillery/registry", "flows": "distillery/flows", "demo": "distillery/demo"}
    for folder, installed in folders.items():  # every module of the checkout is installed
        for path in (ROOT / folder).rglob("*.py"):
            assert f"{installed}/{path.relative_to(ROOT / folder).as_posix()}" in names, path
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "distillery = distillery.cli:app" in meta
