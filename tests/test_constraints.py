"""constraints/: the versions CI installs. floor.txt is the Airflow pyproject.toml states as its floor,
newest.txt a later Airflow 3, and both pin everything `make venv` installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT, airflow_floor, pyproject

CONSTRAINTS = ROOT / "constraints"


def pins(path: Path) -> dict[str, Version]:
    """The ``name==version`` lines of a constraints file, by canonical name.

    :param path: the constraints file.
    """
    found = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = Version(version)
    return found


def test_floor_txt_pins_the_floor_pyproject_states():
    assert pins(CONSTRAINTS / "floor.txt")["apache-airflow"] == airflow_floor()


def test_newest_txt_pins_an_airflow_3_at_or_above_the_floor():
    newest = pins(CONSTRAINTS / "newest.txt")["apache-airflow"]
    assert newest.major == 3 and newest >= airflow_floor()


@pytest.mark.parametrize("name", ["floor.txt", "newest.txt"])
def test_each_file_pins_every_requirement_and_says_how_it_was_made(name):
    project, core = pyproject()["project"], pyproject(ROOT / "core")["project"]
    # The core is this repository's (installed editable from core/, never pinned); its dependencies are.
    ours = [d for d in project["dependencies"] if Requirement(d).name == core["name"]]
    assert ours, "the provider depends on the core"
    wanted = [d for d in project["dependencies"] if d not in ours] + core["dependencies"]
    wanted += [*project["optional-dependencies"]["test"], *project["optional-dependencies"]["dev"]]
    pinned = pins(CONSTRAINTS / name)
    for line in wanted:
        req = Requirement(line)
        assert canonicalize_name(req.name) in pinned, f"{req.name} is not pinned: run make constraints"
        assert pinned[canonicalize_name(req.name)] in req.specifier, f"{name} pins {req.name} outside {req}"
    header = (CONSTRAINTS / name).read_text().splitlines()[0]
    airflow = pinned["apache-airflow"]
    made = rf"# pip constraints: Airflow {airflow} \(\w+\), Python 3\.\d+\.\d+, \d{{4}}-\d\d-\d\d\."
    assert re.fullmatch(made, header), header
