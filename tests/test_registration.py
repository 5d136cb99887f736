"""Keras' own loader rebuilds kseg's files after `import kseg`: a semantic
model and PANet, saved compiled as `kseg train` compiles them, loaded
compiled and not, in fresh processes that import kseg (or a part of it)
before Keras."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kseg.training.optimizers import build_optimizer
from kseg.training.recipe import apply_overrides, load_recipe
from kseg.training.semantic import compile_model
from kseg.training.task import build_model

ITERATIONS = 7
TINY = ["backbone.kwargs.widths=[4, 4, 4, 4]", "backbone.kwargs.stem_width=4"]
SEMANTIC_TINY = [*TINY, "model.kwargs.filters=8"]
PANET_TINY = [
    *TINY,
    "model.kwargs.filters=8",
    "model.kwargs.fc_units=16",
    "backbone.kwargs.input_shape=[64, 64, 3]",
]

_LOAD = textwrap.dedent(
    """
    import json, sys
    {first}
    import keras
    import numpy as np

    results = {{}}
    for name, path in json.loads(sys.argv[1]).items():
        for compiled in {compile_modes}:
            model = keras.saving.load_model(path, compile=compiled)
            entry = results[f"{{name}} compile={{compiled}}"] = {{}}
            if compiled:
                entry["optimizer"] = type(model.optimizer).__name__
                entry["iterations"] = int(model.optimizer.iterations.numpy())
                losses = (model.loss or {{}}).items()
                entry["losses"] = {{k: type(v).__name__ for k, v in losses}}
            else:
                outputs = model(np.load(path + ".npy"), training=False)
                key = "logits" if "logits" in outputs else "scores"
                entry["output"] = keras.ops.convert_to_numpy(outputs[key]).tolist()
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`{name: path}` of a PAN and a PANet saved compiled with their
    recipe's optimizer (AdamW, the kseg `PolyWarmup` schedule) and, for PAN,
    `SegmentationCrossEntropy` and the mIoU metric; each beside an input
    image (`path.npy`) and the output the model gives it (`path.out.npy`)."""
    folder = tmp_path_factory.mktemp("saved")
    paths = {}
    keras.utils.set_random_seed(0)
    recipe = apply_overrides(load_recipe("quickstart"), SEMANTIC_TINY)
    model = compile_model(build_model(recipe, 6), recipe, 6, total_steps=10)
    paths["pan"] = _save(model, folder / "pan.keras", (1, 32, 40, 3), "logits")
    recipe = apply_overrides(load_recipe("panet_quickstart"), PANET_TINY)
    model = build_model(recipe, 5)
    model.compile(optimizer=build_optimizer(recipe, total_steps=10))
    paths["panet"] = _save(model, folder / "panet.keras", (1, 64, 64, 3), "scores")
    return paths


def _save(model, path, shape, output):
    image = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
    np.save(f"{path}.npy", image)
    expected = keras.ops.convert_to_numpy(model(image, training=False)[output])
    np.save(f"{path}.out.npy", expected)
    # As after training: the optimizer's variables exist and have moved.
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(ITERATIONS)
    model.save(path)
    return str(path)


@pytest.mark.parametrize(
    "first, compile_modes",
    [("import kseg", (False, True)), ("import kseg.models", (True,))],
)
def test_keras_load_model_after_import_kseg(saved, first, compile_modes):
    # Before: "Could not locate class 'PAN'" after `import kseg`; after
    # `import kseg.models`, compile=True failed on the AdamW's kseg schedule.
    script = _LOAD.format(first=first, compile_modes=compile_modes)
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.splitlines()[-1])
    for name, path in saved.items():
        if False in compile_modes:
            # The same weights and graph: the same float32 computation.
            np.testing.assert_allclose(
                loaded[f"{name} compile=False"]["output"],
                np.load(f"{path}.out.npy"),
                rtol=1e-5,
                atol=1e-5,
            )
        compiled = loaded[f"{name} compile=True"]
        assert compiled["optimizer"] == "AdamW"
        assert compiled["iterations"] == ITERATIONS
        # PANet computes its own losses; PAN's is kseg's cross-entropy.
        expected = {"logits": "SegmentationCrossEntropy"} if name == "pan" else {}
        assert compiled["losses"] == expected
