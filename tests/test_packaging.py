"""What a checkout ships and sets up: pyproject.toml as setuptools reads it, the embedded weights against their
manifest (scripts/setup checks them too, but only warns), and the setup/test commands the README names."""

from __future__ import annotations

import hashlib
import re
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"fluidsrv": "fluidsrv", "fluidsrv_plugins": "plugins"}


def _distribution(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Read pyproject.toml the way the build backend does (warnings as errors), packages discovered."""
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO_ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = Distribution()
        dist.parse_config_files(filenames=["pyproject.toml"])
        dist.set_defaults()
    return dist


def _python_folders(package: str, folder: str) -> set[str]:
    root = REPO_ROOT / folder
    found = {package}
    for path in root.rglob("*.py"):
        parent = path.parent.relative_to(root)
        if parent.parts and "__pycache__" not in parent.parts:
            found.add(".".join((package, *parent.parts)))
    return found


def test_every_subpackage_goes_into_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = _distribution(monkeypatch)
    assert dist.package_dir == PACKAGE_DIRS
    packages = set(dist.packages)
    for package, folder in PACKAGE_DIRS.items():
        missing = _python_folders(package, folder) - packages
        assert not missing, f"setuptools would leave {sorted(missing)} out of a wheel"
    assert "py.typed" in dist.package_data["fluidsrv"]


def test_licence_is_an_spdx_expression_the_build_backend_understands(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = _distribution(monkeypatch)  # a deprecated licence table would raise here
    assert dist.metadata.license_expression == "MIT"
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        requires = [Requirement(text) for text in tomllib.load(f)["build-system"]["requires"]]
    (setuptools,) = [req for req in requires if req.name == "setuptools"]
    assert not setuptools.specifier.contains("76.99"), "license = 'MIT' needs setuptools >= 77"
    assert setuptools.specifier.contains("77.0")


def test_the_embedded_weights_are_the_ones_the_manifest_names() -> None:
    with open(REPO_ROOT / "weights/manifest.toml", "rb") as f:
        entries = [entry for entry in tomllib.load(f)["weights"] if entry["kind"] == "embedded"]
    assert entries
    for entry in entries:
        data = (REPO_ROOT / "weights" / entry["file"]).read_bytes()  # a missing file fails here
        if "size" in entry:
            assert len(data) == entry["size"], entry["name"]
        if entry.get("sha256"):
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{entry['name']}: sha256 differs"


def _readme_command(after: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(re.escape(after) + r".*?```sh\n(.*?)\n```", text, re.S)
    assert block, f"README.md has no sh block after {after!r}"
    return block.group(1).strip()


def test_readme_commands_exist_and_ci_runs_the_test_command() -> None:
    serve = _readme_command("Set up (first run only")
    test = _readme_command("Run the test suite")
    for command in (serve, test):
        script = REPO_ROOT / command.split()[0]
        assert script.is_file() and script.stat().st_mode & 0o111, f"{command} is not an executable script"
    ci_lines = [line.split("#")[0].strip() for line in (REPO_ROOT / ".ci/run").read_text().splitlines()]
    assert test in ci_lines, f".ci/run does not run the README's test command {test!r}"


def test_the_test_group_of_setup_is_the_one_definition() -> None:
    setup = (REPO_ROOT / "scripts/setup").read_text()
    group = re.search(r'^TEST_EXTRAS="([^"]*)"', setup, re.M)
    assert group, "scripts/setup defines no TEST_EXTRAS"
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert set(group.group(1).split()) <= set(extras)
    calls = {
        name: re.findall(r"^\s*(?:\./)?scripts/setup\b([^#\n]*)", (REPO_ROOT / name).read_text(), re.M)
        for name in ("scripts/test", ".ci/run")
    }
    assert [args.split() for args in calls["scripts/test"]] == [["test"]]
    assert all(args.split()[:1] == ["test"] for args in calls[".ci/run"]), calls[".ci/run"]
