"""`oprd compare`: the same fit, once per objective and learning rate, on the same student, prompts and seeds.

Each run is an `oprd fit` of the user's config plus an objective fragment (`configs/opd.yaml`, or any YAML file)
and a learning rate, built by the same CLI as `fit` (so anything `fit` can train can be compared), with a
`CompareProbe` in place of the run's report callbacks and one W&B run per objective and rate, in one W&B group.
Every run starts from the same student weights and sees the prompts in the same order with the same rollout seeds.
The held-out prompts are split in two: the learning rate of each objective is chosen on the `selection` half and
reported on the `test` half.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from jsonargparse import Namespace
from lightning.pytorch.loggers import WandbLogger

from oprd.compare import checks
from oprd.compare.probe import CompareProbe
from oprd.compare.select import Tried, pick_rate
from oprd.data import heldout_source, load_prompts
from oprd.evaluation.report import DistillReport
from oprd.training.guard import NonFiniteError

log = logging.getLogger(__name__)

FRAGMENTS = Path(__file__).resolve().parent / "objectives"
"""The objective fragments shipped in the package (`opd`, `opd_topk`, `mix`, `oprd`): an installed `oprd` finds them
too. The repository's `configs/` links to them, for `oprd fit --config configs/opd.yaml`."""


class Fits(Protocol):
    """How a comparison builds its `fit` runs: given to `compare` by the command that runs it (`oprd compare` gives
    the `fit` CLI's, `oprd.cli.compare.CliFits`), so the runner needs no command line of its own. Picklable: each run
    builds its fit in a fresh process."""

    def parse(self, args: list[str]) -> Namespace:
        """The settings `fit` would get from `args`, checked as `fit` checks them, without loading a model or writing
        a file."""

    def build(self, args: list[str]) -> Any:
        """A `fit` run built from `args`, not started: its `trainer`, `model` and `datamodule`."""

    def prepare_process(self) -> None:
        """Set up a fresh run process (its logging, its view of the command line)."""


@dataclass
class CompareSettings:
    """What to compare and how (see `oprd compare --help`)."""

    configs: list[str]
    """The `fit` config(s) of the pair, data and trainer."""
    objectives: list[str] = field(default_factory=lambda: ["oprd", "opd"])
    """Objective fragments: shipped names (`oprd`, `opd`, `opd_topk`, `mix`) or YAML paths (named after the file,
    `benchmarks/objectives/oprd_std.yaml` -> `oprd_std`)."""
    lrs: dict[str, list[float]] = field(default_factory=dict)
    """Learning rates per objective (`*`: every objective); none given: the config's own. On the command line, rates for
    every objective (`1e-5 3e-5`) or for one (`opd=3e-6,1e-5`)."""
    steps: int | None = None
    """Optimizer steps per run (None: the config's `trainer.max_steps`)."""
    eval_every: int | None = None
    """Steps between held-out evaluations (None: a fifth of the steps)."""
    budget: Literal["steps", "time"] = "steps"
    """`steps`: equal steps; `time`: equal training seconds (`time_s`), steps capped by `steps`."""
    time_s: float | None = None
    """Training seconds per run with `budget: time`."""
    eval_prompts: int = 64
    """Held-out prompts scored (half pick the learning rate, half report it); `data.max_val_prompts` caps the
    trainer's own validation, which a comparison does not run, not these."""
    select: Literal["reverse_kl", "accuracy"] = "reverse_kl"
    """The selection-split metric that picks each objective's learning rate."""
    final_heldout: list[str] = field(default_factory=list)
    """Other prompt sources scored once on the final weights of every run (e.g. `arithmetic-rephrased`)."""
    out: Path = Path("runs/compare")
    """Results folder: `compare.json`, `compare.png`, and one folder per run."""
    extra: list[str] = field(default_factory=list)
    """Flags passed to every run's `fit` (e.g. `--data.batch_size 4`)."""
    group: str = field(default_factory=lambda: time.strftime("compare-%Y%m%d-%H%M%S"))
    """The W&B group of the runs."""

    def __post_init__(self) -> None:
        if not self.configs:
            raise ValueError("oprd compare needs a --config (the pair, data and trainer settings).")
        if self.budget == "time" and not (self.time_s and self.time_s > 0):
            raise ValueError("--budget time needs --time_s, the training seconds each run gets (e.g. --time_s 600).")
        for name in ("steps", "eval_every", "eval_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")
        if self.eval_prompts < 2:
            raise ValueError("--eval_prompts must be >= 2: half pick the learning rate, half report it.")
        files = [fragment(objective) for objective in self.objectives]
        labels = [label(objective) for objective in self.objectives]
        for name in dict.fromkeys(labels):
            same = [objective for objective, other in zip(self.objectives, labels, strict=True) if other == name]
            if len(same) > 1:  # one name would collapse them into one run folder, one table row and one --lr key
                raise ValueError(
                    f"--objectives {' and '.join(same)} are all named {name!r} (the name of a run, a table row and "
                    f"--lr {name}=...): give each objective once, and objectives in different folders different file "
                    "names."
                )
        self.fragments = dict(zip(labels, files, strict=True))
        self.objectives = labels
        unknown = set(self.lrs) - set(self.objectives) - {"*"}
        if unknown:
            raise ValueError(f"--lr names {sorted(unknown)}, which are not among --objectives {self.objectives}.")
        for objective in self.objectives:
            rates = learning_rates(self, objective)
            twice = sorted({lr for lr in rates if rates.count(lr) > 1})
            if twice:
                raise ValueError(f"--lr gives {objective} the rate(s) {twice} more than once: list each rate once.")


def label(objective: str) -> str:
    """An objective's name in tables, runs and `--lr name=...`: the file name of a YAML path, or the name itself."""
    return Path(objective).stem if objective.endswith((".yaml", ".yml")) else objective


def fragment(objective: str) -> Path:
    """The YAML file of an objective: a path, a name in the working folder's `configs/`, or a shipped name."""
    for candidate in (Path(objective), Path("configs") / f"{objective}.yaml", FRAGMENTS / f"{objective}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in FRAGMENTS.glob("*.yaml"))
    raise ValueError(f"Objective {objective!r} is neither a YAML file nor one of configs/: {', '.join(names)}.")


def learning_rates(settings: CompareSettings, objective: str) -> list[float | None]:
    return settings.lrs.get(objective) or settings.lrs.get("*") or [None]


def run_name(objective: str, lr: float | None) -> str:
    return objective if lr is None else f"{objective}-lr{lr:g}"


def progress_name(settings: CompareSettings, objective: str, lr: float | None) -> str:
    """`run 2 of 4: oprd-lr0.003`, as progress lines name a run."""
    runs = [(o, rate) for o in settings.objectives for rate in learning_rates(settings, o)]
    return f"run {runs.index((objective, lr)) + 1} of {len(runs)}: {run_name(objective, lr)}"


def fit_args(settings: CompareSettings, objective: str, lr: float | None) -> list[str]:
    """The `fit` arguments of one run."""
    args = [word for config in settings.configs for word in ("--config", config)]
    args += ["--config", str(settings.fragments[objective])]
    root = settings.out / run_name(objective, lr)
    args += ["--trainer.default_root_dir", str(root), "--checkpoint.save_last", "false"]
    args += ["--trainer.logger", "oprd.evaluation.report.AutoWandbLogger", "--trainer.logger.save_dir", str(root)]
    args += ["--trainer.logger.group", settings.group, "--trainer.logger.name", run_name(objective, lr)]
    args += ["--trainer.logger.project", "oprd-compare", "--trainer.num_sanity_val_steps", "0"]
    # The probe scores the held-out prompts itself, off the clock; the trainer's own validation would repeat that
    # on `data.max_val_prompts` prompts inside a step's training seconds.
    args += ["--trainer.limit_val_batches", "0"]
    if settings.steps is not None:
        args += ["--trainer.max_steps", str(settings.steps)]
    if settings.budget == "time":
        args += ["--model.optim.schedule", "constant"]  # the number of steps is not known ahead
    if lr is not None:
        args += ["--model.optim.lr", repr(lr)]
    return args + settings.extra


def run_isolated(settings: CompareSettings, fits: Fits, objective: str, lr: float | None) -> tuple:
    """`run_one` in a fresh process: every run starts from a clean interpreter (nothing of the previous run's models
    stays in memory), as `oprd fit` would. Returns the probe's rows and summary, and how the run diverged (None when
    it did not)."""
    # Not a multiprocessing Pool: a Pool whose worker dies (killed for memory, say) waits for its result forever.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_child, settings, fits, objective, lr, os.getpid()).result()
        except BrokenProcessPool as err:
            raise ChildProcessError(
                f"oprd compare: run {run_name(objective, lr)} died without a result (killed for memory?). The runs "
                f"finished before it are in {settings.out / 'runs.jsonl'}; lower --data.batch_size or "
                "--model.rollout.max_new_tokens after `--`, or compare fewer objectives per command."
            ) from err


def _child(settings: CompareSettings, fits: Fits, objective: str, lr: float | None, parent: int) -> tuple:
    _exit_with(parent)
    fits.prepare_process()
    probe, diverged = run_one(settings, fits, objective, lr)
    return probe.rows, probe.summary(), diverged


def _exit_with(parent: int) -> None:
    """End this process once `parent` (the comparison that started this run) is gone, killed say: an orphaned run
    would go on training beside whatever runs next."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="oprd-compare-parent", daemon=True).start()


def run_one(
    settings: CompareSettings, fits: Fits, objective: str, lr: float | None
) -> tuple[CompareProbe, dict | None]:
    """Build one run with the `fit` CLI, swap its report callbacks for a `CompareProbe`, train it; returns the probe,
    and `{"step", "why"}` when the run stopped on a non-finite loss or gradient (a result of the comparison: the
    other rates still run)."""
    cli = fits.build(fit_args(settings, objective, lr))
    hp = cli.datamodule.hparams
    items = checks.heldout_items(hp, settings.eval_prompts)
    final = {source: load_prompts(source, "val", seed=hp.seed, num_val=hp.num_val)[: settings.eval_prompts]
             for source in settings.final_heldout}  # fmt: skip
    steps = cli.trainer.max_steps
    every = settings.eval_every or max(steps // 5, 1)
    probe = CompareProbe(
        {"selection": items[0::2], "test": items[1::2]},
        every,
        hp.val_batch_size,
        budget_s=settings.time_s if settings.budget == "time" else None,
        final_only=final,
        name=progress_name(settings, objective, lr),
    )
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, DistillReport)] + [probe]
    diverged = None
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    except NonFiniteError as err:
        diverged = _diverged(err, cli.trainer.default_root_dir)
    if isinstance(cli.trainer.logger, WandbLogger):
        cli.trainer.logger.experiment.finish()
    del cli
    gc.collect()
    return probe, diverged


def _diverged(err: NonFiniteError, root: str) -> dict[str, Any]:
    """What a comparison records of a run that diverged. The guard's hint to lower the rate and resume does not apply
    here (the grid is the point), and neither does its last-good checkpoint: compare keeps no checkpoints."""
    for checkpoint in Path(root).glob(f"nonfinite-step{err.step}-last-good.ckpt"):
        checkpoint.unlink()
    log.warning("compare: the run diverged at step %s (%s); going on with the next.", err.step, err.what)
    return {"step": err.step, "why": err.what}


def compare(settings: CompareSettings, fits: Fits) -> dict[str, Any]:
    """Every objective at every learning rate, each run built by `fits`; returns the rows, each run's cost, and the
    choice per objective."""
    check(settings, fits)
    rows, runs = [], []
    settings.out.mkdir(parents=True, exist_ok=True)
    progress = settings.out / "runs.jsonl"  # each finished run at once: a long comparison stopped half-way keeps them
    checks.keep_earlier_progress(progress)
    progress.write_text("")
    for objective in settings.objectives:
        for lr in learning_rates(settings, objective):
            log.info("compare: %s", progress_name(settings, objective, lr))
            probe_rows, summary, diverged = run_isolated(settings, fits, objective, lr)
            rows += [{"objective": objective, "lr": lr, **row} for row in probe_rows]
            runs.append({"objective": objective, "lr": lr, **summary, "diverged": diverged})
            record = {"run": runs[-1], "rows": rows[len(rows) - len(probe_rows) :]}
            with progress.open("a") as file:
                file.write(json.dumps(record, default=str) + "\n")
    return {"summary": choose(rows, runs, settings), "rows": rows, "runs": runs}


def check(settings: CompareSettings, fits: Fits) -> None:
    """Every run's settings parse and pass `fit`'s checks, and its held-out and `--final_heldout` prompts load, before
    the first run and before anything is written to `--out` (`oprd.compare.checks`)."""
    for objective in settings.objectives:
        for lr in learning_rates(settings, objective):
            data = fits.parse(fit_args(settings, objective, lr)).data.as_dict()
        items = checks.heldout_items(data, settings.eval_prompts)
        checks.check_answers(items[0::2], settings.select, heldout_source(data["train"], data["val"]))
        checks.check_final_heldout(settings.final_heldout, data)


def final_rows(rows: list[dict], objective: str, lr: float | None) -> dict[str, dict]:
    """Split name -> the last evaluation of one run."""
    mine = [r for r in rows if r["objective"] == objective and r["lr"] == lr]
    return {r["split"]: r for r in sorted(mine, key=lambda r: r["step"])}


def choose(rows: list[dict], runs: list[dict], settings: CompareSettings) -> dict[str, Any]:
    """Per objective: the learning rate whose final `select` metric on the selection split is best (see
    `oprd.compare.select`), what that run scored on the test split (and the final-only sets), its cost, every rate
    tried and those that diverged."""
    chosen = {}
    for objective in settings.objectives:
        tried = [run for run in runs if run["objective"] == objective]
        selection = [final_rows(rows, objective, run["lr"]).get("selection", {}) for run in tried]
        pick = pick_rate(
            [Tried(run["lr"], scores, run.get("diverged")) for run, scores in zip(tried, selection, strict=True)],
            settings.select,
        )
        best = next((run for run in tried if run["lr"] == pick.lr), {}) if pick.how != "none" else {}
        finals = final_rows(rows, objective, pick.lr) if best else {}
        chosen[objective] = {
            "lr": pick.lr,
            "how": pick.how,
            "note": pick.note,
            "lrs_tried": [run["lr"] for run in tried],
            "diverged": [{"lr": run["lr"], **run["diverged"]} for run in tried if run.get("diverged")],
            "steps": finals.get("test", {}).get("step"),
            "test": finals.get("test", {}),
            "selection": finals.get("selection", {}),
            "final_only": {split: finals[split] for split in settings.final_heldout if split in finals},
            **{k: best.get(k) for k in ("update_s", "update_mib", "train_s")},
        }
    shared = {lr for objective in settings.objectives for lr in learning_rates(settings, objective)}
    return {
        "objectives": chosen,
        "select": settings.select,
        "one_shared_learning_rate": len(shared) == 1,
        "group": settings.group,
    }
