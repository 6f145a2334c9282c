"""The calibration of the Bridge or of `select` inside `fit`: on-policy rollouts of the student, both models' hidden
states at the mapped layers, then the projectors' own `calibrate`. It runs once, before the first training step; the
result is part of the checkpoint, so a resumed run skips it.
"""

from __future__ import annotations

import logging

import torch
from rich.progress import track

log = logging.getLogger(__name__)


@torch.no_grad()
def collect_rows(module, prompts: list[str], batch_size: int) -> tuple[dict, dict]:
    """Student and teacher states at every mapped pair, on the response tokens of seeded student rollouts.

    Returns:
        (student rows, teacher rows): pair label -> `[n, d]`, at most `bridge.rows` rows each.
    """
    projectors = module.objective.projectors
    config, labels, pairs = projectors.config, projectors.labels, projectors.pairs
    student_rows = {label: [] for label in labels}
    teacher_rows = {label: [] for label in labels}
    collected = 0
    batches = [prompts[i : i + batch_size] for i in range(0, batch_size * config.batches, batch_size)]
    for number, batch in enumerate(track(batches, description="Calibration: collecting hidden states", transient=True)):
        if not batch or collected >= config.rows:
            break
        # Seeded apart from the training rollouts (which derive theirs from the step), never from the global RNG.
        roll = module.sample(batch, module.rollout_cfg, seed=module.hparams.seed * 7919 + number)
        student, teacher = module.states(roll, head=False)
        mask = roll.response_mask.bool()
        for label, (s, t) in zip(labels, pairs, strict=True):
            student_rows[label].append(student[s][mask].float().cpu())
            teacher_rows[label].append(teacher[t][mask].float().cpu())
        collected += int(mask.sum())
    merge = {label: torch.cat(rows)[: config.rows] for label, rows in student_rows.items()}
    return merge, {label: torch.cat(rows)[: config.rows] for label, rows in teacher_rows.items()}


def calibrate_projectors(module, prompts: list[str], batch_size: int) -> dict[str, float]:
    """Collect rows, fit the projectors, and return their metrics: `<kind>/explained/<pair>` and
    `<kind>/cosine/<pair>`, with the projectors' `kind` (`bridge` or `select`)."""
    student, teacher = collect_rows(module, prompts, batch_size)
    rows = min(len(v) for v in student.values())
    projectors = module.objective.projectors
    report = projectors.calibrate(student, teacher, seed=module.hparams.seed)
    metrics = {}
    for label, values in report.items():
        metrics[f"{projectors.kind}/explained/{label}"] = values["explained"]
        metrics[f"{projectors.kind}/cosine/{label}"] = values["cosine"]
    mean_cos = sum(v["cosine"] for v in report.values()) / len(report)
    mean_var = sum(v["explained"] for v in report.values()) / len(report)
    log.info(projectors.calibrated_message(rows, mean_var, mean_cos))
    return metrics
