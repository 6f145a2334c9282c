"""The calibration of the Bridge or of `select` inside `fit`: both models' hidden states at the mapped layers on
batches of prompts (the student's own rollouts, which the caller produces), then the projectors' own `calibrate`;
or, for `select` on a student whose channels are copies of the teacher's, that copy (`copy_select_channels`).
It runs once, before the first training step; the result is part of the checkpoint, so a resumed run skips it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from rich.progress import track
from torch import Tensor

from oprd.models.capture import Point
from oprd.objective.select import SelectProjectors, copied_channels

log = logging.getLogger(__name__)


Rows = Callable[[list[str], int], tuple[dict[Point, Tensor], dict[Point, Tensor], Tensor]]
"""Given a batch of calibration prompts and its number: student states, teacher states (capture point -> `[b, t, d]`)
and the `[b, t]` boolean mask of the tokens to keep (the responses)."""


@torch.no_grad()
def collect_rows(projectors, states: Rows, prompts: list[str], batch_size: int) -> tuple[dict, dict]:
    """Student and teacher states at every mapped pair, on the masked tokens of `states`' batches.

    Returns:
        (student rows, teacher rows): pair label -> `[n, d]`, at most `bridge.rows` rows each.
    """
    config, labels, pairs = projectors.config, projectors.labels, projectors.pairs
    student_rows = {label: [] for label in labels}
    teacher_rows = {label: [] for label in labels}
    collected = 0
    batches = [prompts[i : i + batch_size] for i in range(0, batch_size * config.batches, batch_size)]
    for number, batch in enumerate(track(batches, description="Calibration: collecting hidden states", transient=True)):
        if not batch or collected >= config.rows:
            break
        student, teacher, mask = states(batch, number)
        for label, (s, t) in zip(labels, pairs, strict=True):
            student_rows[label].append(student[s][mask].float().cpu())
            teacher_rows[label].append(teacher[t][mask].float().cpu())
        collected += int(mask.sum())
    merge = {label: torch.cat(rows)[: config.rows] for label, rows in student_rows.items()}
    return merge, {label: torch.cat(rows)[: config.rows] for label, rows in teacher_rows.items()}


def calibrate_projectors(projectors, states: Rows, prompts: list[str], batch_size: int, seed: int) -> dict[str, float]:
    """Collect rows, fit the projectors, and return their metrics: `<kind>/explained/<pair>` and
    `<kind>/cosine/<pair>`, with the projectors' `kind` (`bridge` or `select`).

    Args:
        projectors: `BridgeProjectors` or `SelectProjectors`.
        states: the states of a batch of prompts (`Rows`): the student's own seeded rollouts in `fit`.
        seed: seeds the split of the rows into fit and held-out parts.
    """
    student, teacher = collect_rows(projectors, states, prompts, batch_size)
    rows = min(len(v) for v in student.values())
    report = projectors.calibrate(student, teacher, seed=seed)
    metrics = {}
    for label, values in report.items():
        metrics[f"{projectors.kind}/explained/{label}"] = values["explained"]
        metrics[f"{projectors.kind}/cosine/{label}"] = values["cosine"]
    mean_cos = sum(v["cosine"] for v in report.values()) / len(report)
    mean_var = sum(v["explained"] for v in report.values()) / len(report)
    log.info(projectors.calibrated_message(rows, mean_var, mean_cos))
    return metrics


def copy_select_channels(projectors: SelectProjectors, student_embedding: Tensor, teacher_embedding: Tensor) -> bool:
    """`select` on a student whose channels are copies of the teacher's (pruned from it): match each student channel
    with the one it was copied from, read off the two input embeddings (whole, on any device), with no rollouts.
    False, and nothing done, for another student (calibrate it)."""
    # On the CPU: the two models may sit on different devices.
    channels = copied_channels(student_embedding.detach().cpu(), teacher_embedding.detach().cpu())
    if channels is None:
        return False
    projectors.copy_channels(channels)
    log.info(
        "select: the student's %d channels are copies of the teacher's (its embedding columns are the teacher's): "
        "each is compared with the channel it was copied from, without calibration.",
        len(channels),
    )
    return True
