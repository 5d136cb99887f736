"""Loading saved kseg models, with messages that say what is wrong."""

import zipfile
from pathlib import Path

import keras


def load_model(path):
    """Loads a `.keras` model that kseg wrote (`kseg train`'s `model.keras`,
    its `checkpoints/*.keras`, or `model.save`), for inference.

    The model is loaded uncompiled: its optimizer and learning-rate schedule
    are training state, which inference does not need (and which may name
    classes of the training code). Every kseg layer and model class is
    registered by importing `kseg.models`.

    Args:
        path: str or Path of the `.keras` file.

    Returns:
        The `keras.Model`.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a complete `.keras` archive (damaged,
            truncated by an interrupted write, or another kind of file), or
            its content cannot be rebuilt; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a .keras model file")
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise ValueError(
            f"{path} is not a complete .keras model file ({size} bytes, not a "
            ".keras zip archive): it is damaged or was cut off while being "
            "written; use another checkpoint of the run"
        )
    try:
        return keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot load the model {path}: {error}") from None
