"""`oprd predict` writes what the student answers: one JSON line per held-out prompt."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


def output_path(root: str | Path, *inputs: str | None) -> Path:
    """Where `oprd predict` writes: `<root>/predictions.jsonl` (`predictions.rank<N>.jsonl` with several processes).

    Args:
        root: the run's folder (`trainer.default_root_dir`).
        inputs: the data's prompt sources (`data.train`, `data.val`); built-in names and None are not files.

    Raises:
        ValueError: a prompt file is one that predict would write, so the run would replace the prompts it reads.
    """
    path = Path(root) / "predictions.jsonl"
    for source in inputs:
        if source is None or not Path(source).is_file():
            continue
        given = Path(source).resolve()
        written = given.name == path.name or re.fullmatch(r"predictions\.rank\d+\.jsonl", given.name)
        if written and given.parent == path.resolve().parent:
            raise ValueError(
                f"The prompt file {source} is where `oprd predict` writes its responses ({path}, one file per "
                "process: predictions[.rank<N>].jsonl) and would be overwritten: rename or move the prompt file, or "
                "set --trainer.default_root_dir to another folder."
            )
    return path


class JSONLWriter(BasePredictionWriter):
    """Write each predicted batch (`{"prompt", "response"}` dicts) as JSON lines to `path`, as it comes.

    Args:
        path: the JSONL file; replaced at the start of each prediction run. With several processes each rank writes
            `<stem>.rank<N>.jsonl` beside it.
    """

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.written = 0

    def _file(self, trainer) -> Path:
        if trainer.world_size == 1:
            return self.path
        return self.path.with_name(f"{self.path.stem}.rank{trainer.global_rank}{self.path.suffix}")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._file(trainer).parent.mkdir(parents=True, exist_ok=True)
        self._file(trainer).write_text("")
        self.written = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction: list[dict[str, Any]], batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        with self._file(trainer).open("a", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction)
        self.written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        log.info("Wrote %d responses to %s", self.written, self._file(trainer))
