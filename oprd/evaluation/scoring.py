"""Held-out scoring: greedy answers of the student (or the teacher), scored by the teacher and by reference answers.

Shape legend:
    b  held-out prompts in the batch
    t  prompt + response tokens

The teacher scores every response with the exact reverse KL over the full vocabulary (whatever the training
objective), the hidden-state term and per-pair cosine; answers give accuracy; repetition and distinct-4 catch the
degenerate loops that can drive a KL down (on-policy distillation is known to collapse into repetition).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from oprd.distiller import DEFAULT_TEACHER, Distiller, Responder
from oprd.evaluation.metrics import accuracy, distinct_n, is_correct, repetition_rate
from oprd.losses.hidden import mean_cosine
from oprd.models.capture import NORM

ANSWERED = "answered"
"""The metric counting a batch's prompts with a reference answer: accuracy metrics are means over those alone."""

EVAL_SEED = 20_240_601
"""Seed of the sampled evaluation: every model and checkpoint is scored on the same draws."""

TEACHER_FREE = ("reverse_kl", "response_length", "distinct_4", "repetition", ANSWERED)
"""`score`'s metrics that mean the same whichever teacher scored (with accuracy): several teachers' are also averaged
over all prompts. The hidden-state ones compare each teacher's own layer pairs and stay per teacher."""


@torch.no_grad()
def sampled_accuracy(distiller: Distiller, prompts: list[str], answers: list[str], k: int) -> dict[str, Tensor]:
    """Avg@k and Best@k as papers report them (the OPRD paper: Avg@16 at T=0.7, top-p 0.95): k sampled answers per
    prompt; Avg@k is the mean accuracy over all samples, Best@k the fraction of prompts with a correct one."""
    settings = distiller.evaluation
    greedy = distiller.rollout.greedy(settings.max_new_tokens)
    config = replace(greedy, do_sample=True, temperature=settings.temperature, top_p=settings.top_p, num_generations=k)
    texts = distiller.pair.decode(distiller.sample(prompts, config, seed=EVAL_SEED + distiller.seed))
    correct = torch.tensor([is_correct(text, answers[i // k]) for i, text in enumerate(texts)], dtype=torch.float32)
    per_prompt = correct.view(len(prompts), k)
    return {f"accuracy_avg@{k}": per_prompt.mean(), f"accuracy_best@{k}": per_prompt.amax(dim=1).mean()}


def is_answer_metric(name: str) -> bool:
    """Whether metric `name` is a mean over the answered prompts only (accuracy and its sampled variants)."""
    return name == "accuracy" or name.startswith("accuracy_")


def prompts_covered(metrics: dict[str, Tensor | float], batch_size: int) -> dict[str, int]:
    """How many prompts each of `score`'s batch metrics is a mean over: the answered ones for accuracy, every prompt
    of the batch for the others (`answered` itself is a count, to be summed)."""
    answered = int(metrics[ANSWERED]) if ANSWERED in metrics else batch_size
    return {name: answered if is_answer_metric(name) else batch_size for name in metrics}


def mean_over_batches(batches: list[tuple[dict[str, Tensor | float], int]]) -> dict[str, float]:
    """`score`'s metrics of several batches `(metrics, batch size)` as one: each metric weighted by the prompts it
    covers (a batch without answers adds nothing to accuracy), `answered` summed."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics, batch_size in batches:
        for name, count in prompts_covered(metrics, batch_size).items():
            weight = 1 if name == ANSWERED else count
            sums[name] = sums.get(name, 0.0) + float(metrics[name]) * weight
            counts[name] = counts.get(name, 0) + count
    return {name: value if name == ANSWERED else value / counts[name] for name, value in sums.items() if counts[name]}


@torch.no_grad()
def score(
    distiller: Distiller,
    prompts: list[str],
    answers: list[str | None],
    responder: Responder = "student",
    per_row: bool = False,
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """Greedy responses to held-out prompts, scored by the teacher (exact reverse KL, hidden states) and answers.

    Args:
        responder: `student` or `teacher`: who answers (the teacher scores either way).
        per_row: also compute each response's own reverse KL (for sample tables).

    Returns:
        batch metrics (`reverse_kl`, `hidden`, `cos/<pair>`, `accuracy`, `answered`, ...) and one dict per
        response. `accuracy` (and `accuracy_avg@k`, `accuracy_best@k`) are over the `answered` prompts only (absent
        when there are none); `prompts_covered` says how many prompts each metric averages.
    """
    pair, objective = distiller.pair, distiller.objective
    model = pair.teacher if responder == "teacher" else None
    roll = distiller.sample(prompts, distiller.rollout.greedy(distiller.evaluation.max_new_tokens), model=model)
    texts = pair.decode(roll)
    metrics = {"reverse_kl": torch.zeros(())}  # the teacher's answers, scored against itself: 0 by definition
    if responder != "teacher":
        student, teacher = distiller.states(roll, head=True)
        terms = objective(student, teacher, roll, pair.heads(), objective.eval_kl)
        values = terms.metrics()
        metrics["reverse_kl"] = values["token_kl"]
        if objective.pairs:
            metrics["hidden"] = values["hidden"]
            metrics.update({k: v for k, v in values.items() if k.startswith("cos/")})
        if student[NORM].shape[-1] == teacher[NORM].shape[-1]:  # comparable without a projection: equal widths
            metrics["cos_final"] = mean_cosine(student[NORM], teacher[NORM], roll.response_mask)
    metrics["response_length"] = roll.response_lengths.float().mean()
    metrics["distinct_4"] = torch.tensor(distinct_n(texts, 4))
    metrics["repetition"] = torch.tensor(sum(repetition_rate(t, 4) for t in texts) / len(texts))
    # Accuracy is over the prompts that have an answer; `answered` says how many that was.
    answered = [i for i, answer in enumerate(answers) if answer is not None]
    metrics[ANSWERED] = torch.tensor(float(len(answered)))
    if answered:
        metrics["accuracy"] = torch.tensor(accuracy([texts[i] for i in answered], [answers[i] for i in answered]))
        k = distiller.evaluation.samples
        if k and responder != "teacher":
            asked = [prompts[i] for i in answered]
            metrics.update(sampled_accuracy(distiller, asked, [answers[i] for i in answered], k))
    rows = [
        {"prompt": p, "response": t, "answer": a, "correct": is_correct(t, a)}
        for p, t, a in zip(prompts, texts, answers, strict=True)
    ]
    if per_row and responder != "teacher":
        for i, row in enumerate(rows):
            one = replace(
                roll,
                input_ids=roll.input_ids[i : i + 1],
                attention_mask=roll.attention_mask[i : i + 1],
                response_mask=roll.response_mask[i : i + 1],
            )
            kl = objective.token_sum(
                student[NORM][i : i + 1], teacher[NORM][i : i + 1], one, pair.heads(), objective.eval_kl
            )
            row["reverse_kl"] = float(kl / one.response_mask.sum().clamp_min(1))
    return metrics, rows


Groups = dict[str, tuple[dict[str, Tensor], int]]
"""`score`'s metrics of each teacher's prompts, and how many prompts that was."""


@torch.no_grad()
def score_by_teacher(
    distiller: Distiller,
    prompts: list[str],
    answers: list[str | None],
    teachers: list[str | None] | None = None,
    responder: Responder = "student",
    per_row: bool = False,
) -> tuple[Groups, list[dict[str, Any]]]:
    """`score` with each prompt scored by its own teacher (`Distiller.route`; `teachers`: each prompt's `teacher`
    column): the metrics by teacher, and the rows in the prompts' order (with their `teacher` when a run has
    several)."""
    groups: Groups = {}
    rows: list[dict[str, Any]] = [{} for _ in prompts]
    for name, each, indices in distiller.route(teachers, len(prompts)):
        asked = [prompts[index] for index in indices]
        metrics, found = score(each, asked, [answers[index] for index in indices], responder, per_row)
        groups[name] = (metrics, len(indices))
        for index, row in zip(indices, found, strict=True):
            rows[index] = {**row, "teacher": name} if distiller.others else row
    return groups, rows


def is_teacher_free(name: str) -> bool:
    """Whether metric `name` means the same whichever teacher scored (`TEACHER_FREE`, and accuracy)."""
    return name in TEACHER_FREE or is_answer_metric(name)


def teacher_free(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics of `TEACHER_FREE` and accuracy."""
    return {name: value for name, value in metrics.items() if is_teacher_free(name)}


def weighted_scores(groups: Groups, several: bool) -> dict[str, tuple[Tensor | float, int]]:
    """One batch's `score_by_teacher` as `{metric: (value, prompts it covers)}`, for a logger that weights each batch
    by the prompts it covers. `several` (the run has several teachers): each teacher's as `<teacher>/<metric>`, and
    the `TEACHER_FREE` ones and accuracy over all prompts."""
    if not several:
        metrics, size = groups[DEFAULT_TEACHER]
        return {name: (metrics[name], count) for name, count in prompts_covered(metrics, size).items()}
    weighted: dict[str, tuple[Tensor | float, int]] = {}
    totals: dict[str, int] = {}
    for teacher, (metrics, size) in groups.items():
        for name, count in prompts_covered(metrics, size).items():
            weighted[f"{teacher}/{name}"] = (metrics[name], count)
            if is_teacher_free(name):
                totals[name] = totals.get(name, 0) + count
    overall = mean_over_batches([(teacher_free(metrics), size) for metrics, size in groups.values()])
    weighted.update({name: (value, totals[name]) for name, value in overall.items()})
    return weighted


def mean_by_teacher(batches: list[Groups], several: bool) -> dict[str, float]:
    """`score_by_teacher`'s metrics of several batches as one (`mean_over_batches`); `several`: each teacher's as
    `<teacher>/<metric>`, and the `TEACHER_FREE` ones and accuracy over all prompts."""
    if not several:
        return mean_over_batches([groups[DEFAULT_TEACHER] for groups in batches])
    entries = [(teacher, entry) for groups in batches for teacher, entry in groups.items()]
    merged = mean_over_batches([(teacher_free(metrics), size) for _, (metrics, size) in entries])
    for teacher in dict.fromkeys(teacher for teacher, _ in entries):
        own = mean_over_batches([entry for name, entry in entries if name == teacher])
        merged.update({f"{teacher}/{name}": value for name, value in own.items()})
    return merged
