"""On- and off-policy responses (GKD, arXiv 2306.13649): the student's own samples on a fraction `lambda` of the
steps, the others from the data's reference responses or, for sequence-level KD, from the teacher."""

from __future__ import annotations

import random

from oprd.rollout.sampling import Rollout, eos_ids, rollout_from_responses, rollout_seed


def coin_seed(seed: int, step: int) -> int:
    """The seed of optimizer step `step`'s on/off-policy coin. It depends on the step, not on the micro-batch: GKD
    picks the kind of responses per update, so every micro-batch of a gradient-accumulation step (on every rank, and
    in a resumed run, which restores the step count) takes the same kind."""
    return rollout_seed(seed, 0, step, rank=0)


def is_on_policy(lmbda: float, seed: int) -> bool:
    """Whether a step samples the student: a coin of bias `lmbda` flipped from the step's seed, so a resumed run
    makes the same choices."""
    return lmbda >= 1 or random.Random(seed).random() < lmbda


def step_responses(
    module, batch: dict[str, list], seed: int, coin_seed: int | None = None, lmbda: float | None = None
) -> tuple[Rollout, bool]:
    """A step's responses for `module` (a DistillModule), and whether they are the student's own.

    `seed` samples the responses (one per rank); `coin_seed` (default `seed`) picks on- or off-policy and must be the
    same on every rank: a sharded student generates in lockstep, so all ranks must take the same branch. `lmbda`
    (default `rollout.lmbda`) is this step's on-policy fraction.
    """
    config = module.rollout_cfg
    if is_on_policy(config.lmbda if lmbda is None else lmbda, seed if coin_seed is None else coin_seed):
        return module.sample(batch["prompt"], config, seed=seed), True
    if config.seq_kd:
        return module.sample(batch["prompt"], config, seed=seed, model=module.pair.teacher), False
    if any(response is None for response in batch["response"]):
        raise ValueError(
            'rollout.lmbda < 1 takes off-policy responses from the data, and a prompt has no "response": add one to '
            "every line, or set rollout.seq_kd: true to sample them from the teacher."
        )
    tokenizer, prompts = module.pair.tokenizer, module.pair.format(batch["prompt"])
    eos = eos_ids(module.student, tokenizer)
    roll = rollout_from_responses(
        tokenizer, prompts["input_ids"], prompts["attention_mask"], batch["response"], eos, config.max_new_tokens
    )
    return roll.to(module.device), False
