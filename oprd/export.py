"""Write the distilled student as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def export_student(module, folder: str | Path, overwrite: bool = False) -> Path:
    """Save the student's weights, config, generation config and the tokenizer into `folder`.

    The folder is written next to its destination and moved into place at the end, so an interrupted export never
    leaves half a model behind. A non-empty folder is refused unless `overwrite` is set, to never lose a user's model.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty; choose another folder or pass overwrite=True (--overwrite).")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        module.student.save_pretrained(staging)
        module.tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
