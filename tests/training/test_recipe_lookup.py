"""Where recipes are found: `$KSEG_RECIPES`, the checkout's `recipes/`, then
the `kseg.recipes` package a wheel installs (simulated here by a folder on
`kseg.__path__`, which is where an installed wheel's `kseg/recipes/` is
found)."""

import shutil

import pytest

import kseg
from kseg.training import recipe_files as recipes
from kseg.training.recipe import find_recipe, list_recipes, load_recipe, recipe_dirs


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """`(site, folder)`: a folder importable as `kseg.recipes` holding a copy
    of the quickstart recipe and `installed_only.yaml`."""
    site = tmp_path / "site"
    folder = site / "recipes"
    folder.mkdir(parents=True)
    shutil.copy(recipes.CHECKOUT_RECIPES / "quickstart.yaml", folder)
    shutil.copy(
        recipes.CHECKOUT_RECIPES / "quickstart.yaml", folder / "installed_only.yaml"
    )
    monkeypatch.setattr(kseg, "__path__", [*kseg.__path__, str(site)])
    monkeypatch.delenv(recipes.RECIPES_ENV, raising=False)
    return site, folder


def test_a_wheel_install_finds_the_packaged_recipes(installed, tmp_path, monkeypatch):
    _, folder = installed
    # No checkout beside the installed package.
    monkeypatch.setattr(recipes, "CHECKOUT_RECIPES", tmp_path / "no-checkout")
    assert recipe_dirs() == [folder]
    assert list_recipes() == {
        "installed_only": folder / "installed_only.yaml",
        "quickstart": folder / "quickstart.yaml",
    }
    assert find_recipe("quickstart") == folder / "quickstart.yaml"
    assert load_recipe("quickstart").name == "quickstart"


def test_environment_then_checkout_then_installed(installed, tmp_path, monkeypatch):
    _, folder = installed
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(recipes.CHECKOUT_RECIPES / "quickstart.yaml", mine)
    monkeypatch.setenv(recipes.RECIPES_ENV, str(mine))
    assert recipe_dirs() == [mine, recipes.CHECKOUT_RECIPES, folder]
    # The first directory holding a name wins.
    assert find_recipe("quickstart") == mine / "quickstart.yaml"
    found = list_recipes()
    assert found["pan_r101-os16_4xb4-voc-512"].parent == recipes.CHECKOUT_RECIPES
    assert found["installed_only"] == folder / "installed_only.yaml"

    monkeypatch.delenv(recipes.RECIPES_ENV)
    assert find_recipe("quickstart") == recipes.CHECKOUT_RECIPES / "quickstart.yaml"


def test_a_folder_reached_twice_is_listed_once(installed, monkeypatch):
    # An editable install maps kseg.recipes to the checkout's recipes/.
    _, folder = installed
    monkeypatch.setattr(recipes, "CHECKOUT_RECIPES", folder)
    monkeypatch.setenv(recipes.RECIPES_ENV, str(folder))
    assert recipe_dirs() == [folder]


def test_missing_recipe_names_every_searched_folder(installed):
    _, folder = installed
    with pytest.raises(FileNotFoundError, match=str(folder)):
        find_recipe("no_such_recipe")


def test_listing_reads_descriptions_and_names_unreadable_files(tmp_path, monkeypatch):
    from kseg.training.recipe_files import recipe_description

    good = tmp_path / "good.yaml"
    good.write_text("description: >-\n  Two\n  lines\nmodel: {name: pan}\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("description: [unclosed\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert recipe_description(good) == "Two lines"
    assert recipe_description(broken).startswith("(unreadable recipe: ")
    assert recipe_description(empty) == "(not a recipe: the file holds no sections)"
    monkeypatch.setenv(recipes.RECIPES_ENV, str(tmp_path))
    assert list(list_recipes())[:3] == [
        "broken",
        "empty",
        "exfuse_x101-32x4d-lr_4xb4-voc-512",
    ]
