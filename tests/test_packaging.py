"""setup.cfg ships every kseg package and the recipes, checked without a
build (a built wheel: `pip wheel . --no-deps`, installed into a fresh venv,
lists the recipes with `kseg recipes`)."""

import configparser
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def _options():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def _lines(value):
    return [line.strip() for line in value.strip().splitlines() if line.strip()]


def test_every_package_is_listed():
    listed = _lines(_options()["options"]["packages"])
    found = find_packages(str(REPO), include=["kseg", "kseg.*"])
    assert sorted(listed) == sorted([*found, "kseg.recipes"])


def test_the_recipes_folder_is_the_kseg_recipes_package():
    options = _options()
    package_dir = dict(
        (part.strip() for part in line.split("=", 1))
        for line in _lines(options["options"]["package_dir"])
    )
    assert package_dir == {"kseg.recipes": "recipes"}
    assert _lines(options["options.package_data"]["kseg.recipes"]) == ["*.yaml"]
    assert not (REPO / "kseg" / "recipes").exists()
    files = sorted((REPO / "recipes").iterdir())
    assert any(path.name == "quickstart.yaml" for path in files)
    # Everything in the folder matches the package data pattern.
    assert [path for path in files if path.suffix != ".yaml"] == []
