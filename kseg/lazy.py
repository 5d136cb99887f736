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
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
