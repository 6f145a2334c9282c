"""Settings of the model that the CLI takes from the data section, because the model is built without the data."""

from __future__ import annotations

from jsonargparse import Namespace

CALIBRATION_FROM_DATA = {"calibration": "train", "calibration_seed": "seed", "calibration_num_val": "num_val"}
"""Width- and depth-pruning calibration setting -> the data setting it defaults to."""


def calibrate_on_training_prompts(config: Namespace) -> None:
    """Fill each width- or depth-pruned model's unset calibration source and split from `data`, in place: pruning is
    ranked on the run's own training prompts (Minitron), never on a built-in split that overlaps the held-out prompts.

    Args:
        config: one subcommand's parsed config (`model`, `data`, ...), before the classes are built.
    """
    for side in ("teacher", "student"):
        for kind in ("width", "depth"):
            prune = config.model.get(side, Namespace()).get(kind) if config.get("model") else None
            if prune is None:
                continue
            for key, data_key in CALIBRATION_FROM_DATA.items():
                if prune.get(key) is None and config.data.get(data_key) is not None:
                    prune[key] = config.data[data_key]
