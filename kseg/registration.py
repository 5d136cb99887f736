"""Keras' own loader finds kseg's classes after `import kseg`.

`keras.saving.load_model("runs/.../model.keras")` rebuilds a kseg model only
if kseg's classes are registered with Keras, which happens when the modules
defining them are imported: the layers and models (`kseg.models`) and, for a
file saved compiled by `kseg train`, its loss, metrics, optimizer and
learning-rate schedule (`kseg.training`). `import kseg` must not import
Keras itself (the `kseg` command builds its parser without TensorFlow), so
it calls `register_when_keras_loads()`: the modules are imported at once if
Keras is loaded, else as soon as an import that loads it ends.

An import hook (`sys.meta_path`) follows the imports of `keras`,
`tensorflow`, `jax` and of kseg's own modules, and registers only when none
of them is still being imported: registering while one were half-imported
would import kseg's modules against it (Keras is loaded from inside
`import tensorflow`, and from inside kseg's own modules). The training
modules need TensorFlow (`kseg.data`): on another Keras backend they
register once TensorFlow is imported. The hook removes itself when
everything is registered.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MODEL_MODULES = ("kseg.models",)
TRAINING_MODULES = (
    "kseg.training.losses",
    "kseg.training.metrics",
    "kseg.training.optimizers",
    "kseg.training.schedules",
)
_FRAMEWORKS = ("keras", "tensorflow", "jax")
_FILE_LOADERS = (
    importlib.machinery.SourceFileLoader,
    importlib.machinery.SourcelessFileLoader,
    importlib.machinery.ExtensionFileLoader,
)

_registered = set()
_importing = set()


def register_keras_objects(training=True):
    """Imports the modules that register kseg's classes with Keras: the
    layers and models, and with `training=True` the losses, metrics,
    optimizers and schedules (these import TensorFlow)."""
    for name in MODEL_MODULES + (TRAINING_MODULES if training else ()):
        importlib.import_module(name)


def register_when_keras_loads():
    """Registers kseg's classes with Keras now if Keras is loaded, else when
    an import that loads it ends (see the module docstring)."""
    _register_if_ready()
    if len(_registered) < 2 and not any(
        isinstance(finder, _ImportWatcher) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _ImportWatcher())


def _loaded(name, ended):
    """Whether module `name` is imported and its import has ended (`ended`:
    the module whose import just ended, still marked as initializing)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    initializing = getattr(spec, "_initializing", False) and name != ended
    return module is not None and not initializing


def _register_if_ready(ended=None):
    if _importing or not _loaded("keras", ended):
        return
    if any(name in sys.modules and not _loaded(name, ended) for name in _FRAMEWORKS):
        return
    parts = [("models", False)]
    if _loaded("tensorflow", ended):
        parts.append(("training", True))
    for part, training in parts:
        if part in _registered:
            continue
        _registered.add(part)
        try:
            register_keras_objects(training)
        except Exception as error:  # an import hook must not break the import
            warnings.warn(
                f"kseg could not register its classes with Keras ({error!r}); "
                "keras.saving.load_model cannot rebuild kseg models: use "
                "kseg.models.load_model",
                stacklevel=2,
            )
    if len(_registered) == 2:
        for finder in [f for f in sys.meta_path if isinstance(f, _ImportWatcher)]:
            sys.meta_path.remove(finder)


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: marks the imports of the frameworks and of
    kseg's modules, and registers when the last of them ends."""

    def __init__(self):
        self._finding = False

    def find_spec(self, fullname, path, target=None):
        # Another import hook may ask every finder in turn (this one too).
        if self._finding or (
            fullname not in _FRAMEWORKS and not fullname.startswith("kseg.")
        ):
            return None
        self._finding = True
        try:
            spec = next(
                (
                    spec
                    for finder in list(sys.meta_path)
                    if finder is not self and hasattr(finder, "find_spec")
                    for spec in [finder.find_spec(fullname, path, target)]
                    if spec is not None
                ),
                None,
            )
        finally:
            self._finding = False
        if spec is None:
            return None
        loader = spec.loader
        # A file loader serves one module: wrapping its `exec_module` wraps
        # only this import.
        if not isinstance(loader, _FILE_LOADERS):
            return spec
        execute = loader.exec_module

        def exec_module(module):
            _importing.add(fullname)
            try:
                execute(module)
            finally:
                _importing.discard(fullname)
            _register_if_ready(ended=fullname)

        loader.exec_module = exec_module
        return spec
