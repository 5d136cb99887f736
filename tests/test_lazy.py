"""`kseg.lazy.lazy_exports`: names load on first use, whatever the order."""

import subprocess
import sys
import textwrap


def test_a_function_named_like_its_module_survives_a_sibling_import(tmp_path):
    # Before: `from kseg.inference import Prediction, predict` gave the
    # module kseg.inference.predict, not the function, in a fresh process.
    package = tmp_path / "lazypkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            from kseg.lazy import lazy_exports

            _EXPORTS = {"Result": "lazypkg.tool", "tool": "lazypkg.tool"}
            __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
            """
        )
    )
    (package / "tool.py").write_text(
        "class Result:\n    pass\n\n\ndef tool():\n    return Result()\n"
    )
    script = (
        "from lazypkg import Result, tool\n"
        "assert callable(tool) and isinstance(tool(), Result), tool\n"
        "import lazypkg\n"
        "assert lazypkg.tool is tool\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
