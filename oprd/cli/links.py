"""Settings of the model that the CLI takes from the data section, because the model is built without the data."""

from __future__ import annotations

from jsonargparse import Namespace

CALIBRATION_FROM_DATA = {"calibration": "train", "calibration_seed": "seed", "calibration_num_val": "num_val"}
"""Width-pruning calibration setting -> the data setting it defaults to."""


def calibrate_on_training_prompts(config: Namespace) -> None:
    """Fill each width-pruned model's unset calibration source and split from `data`, in place: pruning is ranked on
    the run's own training prompts (Minitron), never on a built-in split that overlaps the held-out prompts.

    Args:
        config: one subcommand's parsed config (`model`, `data`, ...), before the classes are built.
    """
    for side in ("teacher", "student"):
        width = config.model.get(side, Namespace()).get("width") if config.get("model") else None
        if width is None:
            continue
        for key, data_key in CALIBRATION_FROM_DATA.items():
            if width.get(key) is None and config.data.get(data_key) is not None:
                width[key] = config.data[data_key]
