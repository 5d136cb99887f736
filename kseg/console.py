"""What kseg writes to the terminal: progress bars that suit where the
output goes, and no start-up or info lines from TensorFlow's and LiteRT's
C++ code.

Importing this module imports neither Keras nor TensorFlow (the command
line builds its parser without them).
"""

import contextlib
import importlib.abc
import os
import sys
import tempfile


def progress_bar(target, unit_name="step"):
    """A `keras.utils.Progbar` for `target` steps that writes plain text
    unless the output is a terminal.

    Keras redraws its bar with backspaces, carriage returns and colour codes
    whenever it runs on a POSIX system, terminal or not, so a log file of a
    piped command filled with them. Off a terminal the bar prints one plain
    line when it completes (Keras' `verbose=2`).

    Args:
        target: int or `None`. Number of steps, `None` when unknown.
        unit_name: str. What a step is called ("image", "batch").
            Defaults to `"step"`.
    """
    import keras

    interactive = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    return keras.utils.Progbar(
        target, unit_name=unit_name, verbose=1 if interactive else 2
    )


def _user_wants_tensorflow_info():
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    return level is not None and level.strip() in ("", "0")


@contextlib.contextmanager
def native_output_quieted():
    """Keeps what C++ code writes to file descriptor 2 inside the block out
    of the output, unless the user asked for TensorFlow's INFO lines
    (`TF_CPP_MIN_LOG_LEVEL=0`); if the block raises, what it wrote is shown.

    For the lines TensorFlow and LiteRT print with no log level to set:
    the converter's `fully_quantize: 0, inference_type: 6, ...` and
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    """
    if _user_wants_tensorflow_info():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_tensorflow():
    """Imports TensorFlow without its C++ start-up lines.

    On a CPU machine TensorFlow prints CUDA probing lines (`cudart_stub`,
    "failed call to cuInit") and a CPU-feature banner through absl before
    its log level applies, so a command line would open with them. Unless
    the user asked for TensorFlow's INFO lines (`TF_CPP_MIN_LOG_LEVEL=0`),
    the level defaults to 3 and the file descriptor 2 is sent to a
    temporary file while TensorFlow loads; if the import fails, what it
    printed is shown.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_output_quieted():
        import tensorflow  # noqa: F401


def quiet_tensorflow_when_imported():
    """Makes the first `import tensorflow` of this process (by kseg, Keras
    or the user, after `import kseg`) quiet, as `quiet_tensorflow` does; a
    no-op once TensorFlow is loaded or when the user asked for its INFO
    lines."""
    if "tensorflow" in sys.modules or _user_wants_tensorflow_info():
        return
    if not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and runs its module code
    under `native_output_quieted`; removes itself after that import."""

    def __init__(self):
        self._finding = False

    def find_spec(self, fullname, path, target=None):
        # Another import hook may ask every finder in turn (this one too).
        if fullname != "tensorflow" or self._finding:
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
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            with native_output_quieted():
                execute(module)

        spec.loader.exec_module = exec_module
        return spec
