"""The pins agree everywhere: constraints.txt, environment.yml and pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {}
    for line in pip:
        if line.startswith("-e"):
            continue
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    return pins


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_torch_is_pinned_to_the_cpu_build_on_disk():
    assert constraints()["torch"] == "2.13.0"
    assert environment_pins()["torch"] == "2.13.0"


def test_environment_yml_matches_constraints():
    pins = constraints()
    for name, version in environment_pins().items():
        assert pins.get(name) == version, f"{name}: environment.yml {version}, constraints.txt {pins.get(name)}"


def test_every_pyproject_requirement_is_in_environment_yml_and_admits_the_pin():
    env = environment_pins()
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in env, f"{req.name} is required by pyproject.toml but missing from environment.yml"
        assert req.specifier.contains(env[name], prereleases=True), f"{req} does not admit the pinned {env[name]}"


def test_jupyter_book_stays_on_1x():
    assert re.match(r"1\.", constraints()["jupyter-book"])


def test_ci_calls_the_readme_test_command_only():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    commands = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l.strip() and not l.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"]
