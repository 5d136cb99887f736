"""The class names a model's predictions are drawn with, wherever the model
came from: a run's recipe (the model is a run directory, or a `.keras` file in
one) or, for an exported instance model, the categories file `kseg export`
writes beside it."""

from pathlib import Path

from kseg.tasks import is_instance_model


def semantic_class_names(model_path, source_path=None):
    """The class names of a semantic run's recipe (`model_path` is a run
    directory, or a `.keras` file in one; `source_path` the file loaded),
    indexed by class; `None` where no recipe is found (draw `class <k>`)."""
    from kseg.inference.instance_outputs import find_recipe_path
    from kseg.training.recipe import load_recipe
    from kseg.training.semantic import dataset_info

    recipe_path = find_recipe_path(model_path) or (
        find_recipe_path(source_path) if source_path is not None else None
    )
    if recipe_path is None:
        return None
    try:
        recipe = load_recipe(recipe_path)
    except (OSError, ValueError):
        return None
    if recipe.task != "semantic":
        return None
    return tuple(dataset_info(recipe.data).class_names)


def class_names(source):
    """The names to draw `source`'s predictions with.

    Args:
        source: what `kseg.inference.open_model` returns.

    Returns:
        For a semantic model, the name of class k at k (`overlay_with_legend`'s
        `class_names`), or `None` when the model carries none (an export:
        `class <k>`). For an instance model, the name of class k at k − 1
        (`draw_instances`' `class_names`): from the run's recipe or the
        export's categories file, else `class_<k>`.

    Example:
    >>> source = open_model("runs/quickstart/latest")
    >>> class_names(source)
    ('background', 'disc', 'square', 'triangle', 'ring', 'plus')
    """
    from kseg.inference.instance_outputs import find_categories

    path = Path(source.path)
    if not is_instance_model(source.model):
        return semantic_class_names(path)
    num_classes = getattr(source.model, "num_classes", None)
    return tuple(find_categories(path, path, num_classes)[1])
