"""environment.yml and pyproject.toml name the same pinned packages; the Makefile installs everything."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements.extend(extra)
    return dict(_split(r) for r in requirements)


def _split(requirement):
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", requirement)
    assert match, f"not pinned with ==: {requirement!r}"
    return match.group(1).lower().replace("_", "-"), match.group(2)


def _environment_pins():
    pins = {}
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("- pip:"):
            in_pip = True
            continue
        if in_pip and stripped.startswith("- ") and "==" in stripped:
            name, version = _split(stripped[2:])
            pins[name] = version
    return pins


def test_every_dependency_is_pinned_and_both_files_agree():
    pyproject = _pyproject_pins()
    environment = _environment_pins()
    assert pyproject == environment
    assert pyproject["torch"] == "2.14.1" and pyproject["torchvision"] == "0.29.1"


def test_environment_uses_conda_forge_python_311_and_installs_the_package():
    text = (ROOT / "environment.yml").read_text()
    assert "conda-forge" in text and "python=3.11" in text and "-e .[notebooks,test]" in text


def test_makefile_builds_the_venv_from_pyproject_for_test_and_demo():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): pyproject.toml", makefile, re.M)
    assert re.search(r"^test: venv", makefile, re.M) and re.search(r"^demo: venv", makefile, re.M)
    assert "pip install --quiet -e '.[notebooks,test]'" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
