"""The layers of lib/aigc, as pyproject's `[tool.importlinter]` contracts state them: `lint-imports` passes on
the code, and fails on an upward import, a cycle's other half, a heavy import in a light module, or a module
that no layer names; and the modules the `light` contract names import without Ray, torch or FastAPI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "lib"


def lint_imports(lib: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's pyproject on the package `aigc` found under `lib`."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe) if exe.exists() else shutil.which("lint-imports")]
    assert cmd[0], "lint-imports is not installed: pip install -e '.[dev]' (import-linter)"
    env = {**os.environ, "PYTHONPATH": str(lib)}
    return subprocess.run([*cmd, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_lint_imports_passes_on_the_code():
    out = lint_imports(LIB)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" not in out.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_lint_imports_fails_on_an_upward_import_a_cycle_a_heavy_light_module_and_an_unplaced_module(tmp_path):
    pkg = tmp_path / "aigc"
    shutil.copytree(LIB / "aigc", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "config.py", "a") as f:
        f.write("\nfrom aigc import finetune  # noqa: E402  the bottom reaching up\n")
    with open(pkg / "search_config.py", "a") as f:
        f.write("\nimport torch  # noqa: E402  a light module going heavy\n")
    (pkg / "unplaced.py").write_text('"""A module no layer names."""\n')
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "aigc.config is not allowed to import aigc.finetune" in out.stdout, out.stdout
    assert "- .config -> .finetune" in out.stdout.split("No cycles are allowed in aigc.")[1], out.stdout  # the cycle
    assert "aigc.search_config -> torch" in out.stdout, out.stdout
    assert "- aigc.unplaced" in out.stdout, out.stdout


def test_light_modules_import_without_ray_torch_or_fastapi_at_run_time():
    # The `light` contract ignores raycompat -> ray (imported on call, inside each piece): this holds it to that.
    light = ["aigc.config", "aigc.serving.args", "aigc.search_config", "aigc.placement", "aigc.layout", "aigc.corpus"]
    code = (f"import json, sys, {', '.join(light)}; "
            "print(json.dumps(sorted(m for m in ('ray', 'torch', 'fastapi') if m in sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(LIB)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
