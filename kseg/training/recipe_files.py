"""Where recipe files are found, and how their YAML is read, without
importing Keras or TensorFlow (`kseg recipes` lists them in a fraction of a
second).

`kseg.training.recipe` re-exports these names; it loads and checks recipes.
"""

import difflib
import importlib.util
import os
import re
from pathlib import Path

import yaml

RECIPES_ENV = "KSEG_RECIPES"
RECIPE_SUFFIX = ".yaml"
# The repository's recipe folder, present when kseg runs from a checkout.
CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# The same folder inside an installed wheel (setup.cfg `package_dir`).
RECIPES_PACKAGE = "kseg.recipes"
# A recipe is a few kilobytes: YAML that expands (aliases counted at each
# use) to more values and characters than this is refused before it is
# built, so nested aliases (390 bytes growing to gigabytes) fail at once.
MAX_YAML_SIZE = 1_000_000


class RecipeError(ValueError):
    """A recipe that cannot be loaded: unknown key, wrong type or bad value."""


def recipe_dirs():
    """Directories searched for recipe files, in order.

    `$KSEG_RECIPES` (paths joined by the OS path separator) first, then the
    `recipes/` folder of the source checkout kseg is imported from (a clone,
    an editable install), then the recipes installed with kseg: the package
    `kseg.recipes`, which is that same `recipes/` folder shipped in the wheel
    (setup.cfg maps it). Missing directories are left out, and a directory
    reached twice (an editable install maps `kseg.recipes` to the checkout's
    folder) is listed once.
    """
    dirs = [Path(p) for p in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if p]
    dirs.append(CHECKOUT_RECIPES)
    dirs.extend(_installed_recipe_dirs())
    unique = {}
    for directory in dirs:
        if directory.is_dir():
            unique.setdefault(directory.resolve(), directory)
    return list(unique.values())


def _installed_recipe_dirs():
    """The folders of the `kseg.recipes` package (data only, no
    `__init__.py`), found without importing anything."""
    spec = importlib.util.find_spec(RECIPES_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def list_recipes():
    """`{name: path}` of every recipe file found, earlier directories first."""
    found = {}
    for directory in recipe_dirs():
        for path in sorted(directory.glob(f"*{RECIPE_SUFFIX}")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def find_recipe(name_or_path):
    """The path of a recipe given by file path or by name."""
    path = Path(name_or_path)
    if path.suffix == RECIPE_SUFFIX or os.sep in str(name_or_path):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path
    recipes = list_recipes()
    if name_or_path not in recipes:
        searched = ", ".join(str(d) for d in recipe_dirs()) or "no recipe directory"
        raise FileNotFoundError(
            f"no recipe named {name_or_path!r} (searched {searched}; set "
            f"{RECIPES_ENV} to add a directory){_did_you_mean(name_or_path, recipes)}"
        )
    return recipes[name_or_path]


def recipe_description(path):
    """The `description` of the recipe file at `path`, read without checking
    the rest of it; a file that cannot be read or parsed says why instead."""
    try:
        values = parse_yaml(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"(unreadable recipe: {first_line})"
    if not isinstance(values, dict):
        return "(not a recipe: the file holds no sections)"
    return " ".join(str(values.get("description") or "").split())


def _expanded_size(root, limit):
    """The size of the YAML node graph `root` once its aliases are expanded
    (one per node plus the characters of each scalar), counted without
    expanding them; raises `ConstructorError` past `limit` or on a
    recursive alias."""
    sizes = {}

    def size(node):
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise yaml.constructor.ConstructorError(
                    None, None, "a recursive alias", node.start_mark
                )
            return sizes[id(node)]
        sizes[id(node)] = None
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value)
        else:
            children = node.value
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            total = 1
            for child in children:
                total += size(child)
                if total > limit:
                    break
        if total > limit:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the document expands to more than {limit:,} values and "
                "characters (nested aliases?); a recipe is a few kilobytes, "
                "write it out without them",
                node.start_mark,
            )
        sizes[id(node)] = total
        return total

    return size(root)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers (PyYAML, YAML 1.1, reads `1e-4` as a string), and a
    key given twice in one mapping is an error (PyYAML keeps the last), and
    a document larger than `MAX_YAML_SIZE` once expanded is an error."""

    def construct_document(self, node):
        _expanded_size(node, MAX_YAML_SIZE)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text):
    """Parses YAML text with YAML 1.2 number syntax (see `_Loader`).

    Raises:
        yaml.YAMLError: invalid YAML, a duplicate key, or a document
            absurdly large once expanded or nested.
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError("the document is nested too deeply") from None


def _did_you_mean(name, recipes):
    match = difflib.get_close_matches(str(name), list(recipes), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""
