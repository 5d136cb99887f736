"""Package names that load on first use (PEP 562), so that the command line
builds its parser without importing TensorFlow."""

import importlib
import sys


def lazy_exports(package, exports):
    """The `__getattr__` and `__dir__` of a package whose public names live in
    submodules imported on first use.

    Example (in a package's `__init__.py`):
    >>> __getattr__, __dir__ = lazy_exports(__name__, {"predict": "pkg.predict"})

    Args:
        package: str. The package's `__name__`.
        exports: dict of public name → module defining it.
    """

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(exports[name])
        # Every name of that module at once: importing a submodule sets the
        # package attribute of its own name (`kseg.inference.predict`, the
        # module), which would hide the function of that name exported from
        # it once another of its names had been asked for first.
        for export, source in exports.items():
            if source == exports[name]:
                setattr(sys.modules[package], export, getattr(module, export))
        return getattr(module, name)

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
