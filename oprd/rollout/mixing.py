"""On- and off-policy responses (GKD, arXiv 2306.13649): the student's own samples on a fraction `lambda` of the
steps, the others from the data's reference responses or, for sequence-level KD, from the teacher. The coins are
here; `oprd.distiller.Distiller.responses` takes the responses they choose."""

from __future__ import annotations

import random

from oprd.rollout.sampling import rollout_seed


def coin_seed(seed: int, step: int) -> int:
    """The seed of optimizer step `step`'s on/off-policy coin. It depends on the step, not on the micro-batch: GKD
    picks the kind of responses per update, so every micro-batch of a gradient-accumulation step (on every rank, and
    in a resumed run, which restores the step count) takes the same kind."""
    return rollout_seed(seed, 0, step, rank=0)


def is_on_policy(lmbda: float, seed: int) -> bool:
    """Whether a step samples the student: a coin of bias `lmbda` flipped from the step's seed, so a resumed run
    makes the same choices."""
    return lmbda >= 1 or random.Random(seed).random() < lmbda


def check_responses(responses: list[str | None]) -> None:
    """Refuse off-policy data without a reference response for every prompt, naming the two ways out."""
    if any(response is None for response in responses):
        raise ValueError(
            'rollout.lmbda < 1 takes off-policy responses from the data, and a prompt has no "response": add one to '
            "every line, or set rollout.seq_kd: true to sample them from the teacher."
        )
