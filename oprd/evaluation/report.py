"""What a user sees of a run: a before/after summary in the terminal and sample tables in Weights & Biases."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from rich.console import Console
from rich.table import Table

from oprd.distiller import Distiller
from oprd.evaluation.scoring import Groups, mean_by_teacher, score_by_teacher
from oprd.export import save_folder

log = logging.getLogger(__name__)


class AutoWandbLogger(WandbLogger):
    """`WandbLogger` that runs offline when no W&B account is configured, and says how to sync the run later.

    `WANDB_MODE=disabled` still turns W&B off entirely; an explicit `offline: true/false` is respected. W&B's own
    terminal lines are off unless `settings` are given: `DistillReport` prints how to open or sync the run.
    """

    def __init__(self, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = not _has_wandb_account()
        if kwargs.get("settings") is None:  # the CLI passes every wandb.init argument, unset ones as None
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True, disable_git=True)
        super().__init__(offline=offline, **kwargs)
        # Lightning passes `anonymous=None` to `wandb.init`, which W&B answers with a deprecation warning on every run
        # ("The anonymous setting has no effect"); unset, it says nothing. No public argument leaves it out.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def _has_wandb_account() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_online(logger) -> bool | None:
    """Whether a W&B logger's run syncs online (None: not a W&B logger, or W&B is disabled)."""
    if not isinstance(logger, WandbLogger) or os.environ.get("WANDB_MODE") == "disabled":
        return None
    return not logger.experiment.offline


def wandb_hint(logger) -> str | None:
    """How to open this run's W&B page: its URL online, the `wandb sync` command offline."""
    online = wandb_online(logger)
    if online is None:
        return None
    run = logger.experiment
    return run.url if online else f"offline run; upload it with: wandb sync {Path(run.dir).parent}"


class DistillReport(L.Callback):
    """Score the student before and after `fit` on held-out prompts, next to the teacher, and export the student.

    Prints held-out accuracy, teacher-scored reverse KL, repetition and distinct-4 before vs after, a few sample
    answers, the checkpoint, the exported student folder and how to open the W&B run. Logs the same numbers under
    `report/` and, with W&B, tables of sample responses (every `samples_every_n_steps` and at the end).

    Args:
        num_prompts: held-out prompts scored before and after (from the datamodule's validation split).
        num_samples: sample answers shown in the terminal.
        export_dir: folder for the exported student, relative to the run's log folder (None: do not export).
        samples_every_n_steps: log a W&B table of held-out responses every N steps (0: only at the end).
        batch_size: prompts scored at once.
    """

    def __init__(
        self,
        num_prompts: int = 50,
        num_samples: int = 3,
        export_dir: str | None = "student",
        samples_every_n_steps: int = 0,
        batch_size: int = 25,
    ) -> None:
        self.num_prompts, self.num_samples, self.export_dir = num_prompts, num_samples, export_dir
        self.samples_every_n_steps, self.batch_size = samples_every_n_steps, batch_size
        self.results: dict[str, tuple[dict[str, float], list[dict[str, Any]]]] = {}

    def _items(self, trainer) -> list[dict[str, Any]]:
        items = getattr(trainer.datamodule, "val_items", None) or []
        if not items:
            raise ValueError("DistillReport needs held-out prompts: set `data.val` (or use a built-in task).")
        return items[: self.num_prompts]

    def _score(self, distiller: Distiller, items, responder: str, per_row: bool = False):
        batches: list[Groups] = []
        rows: list[dict[str, Any]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            prompts, answers = [x["prompt"] for x in chunk], [x["answer"] for x in chunk]
            teachers = [x.get("teacher") for x in chunk]
            groups, chunk_rows = score_by_teacher(distiller, prompts, answers, teachers, responder, per_row=per_row)
            batches.append(groups)
            rows += chunk_rows
        return mean_by_teacher(batches, several=bool(distiller.others)), rows

    def on_train_start(self, trainer, module) -> None:
        # Scored where training starts (a resumed run's weights and Bridge restored), with the Bridge calibrated: an
        # uncalibrated one scores cosine 0 and hidden 1 whatever the student, which is not the student that trains.
        module.calibrate()
        if trainer.is_global_zero:
            self._score_start(trainer, module.distiller)

    def _score_start(self, trainer, distiller: Distiller) -> None:
        items = self._items(trainer)
        console = Console()
        console.print(f"Scoring the teacher and the untrained student on {len(items)} held-out prompts...")
        self.results["teacher"] = self._score(distiller, items, "teacher")
        self.results["before"] = self._score(distiller, items, "student", per_row=True)
        before = self.results["before"][0]
        console.print(f"  student before: {_brief(before)}; teacher: {_brief(self.results['teacher'][0])}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.samples_every_n_steps and trainer.is_global_zero and step % self.samples_every_n_steps == 0:
            items = self._items(trainer)[: self.batch_size]
            _, rows = self._score(module.distiller, items, "student", per_row=True)
            self._log_table(trainer, f"samples/step_{step}", rows)

    @staticmethod
    def _export(distiller: Distiller, folder: Path) -> Path:
        """Export into `folder`, replacing an earlier export there. A folder holding other files is left as it is and
        the student goes beside it: a finished run does not fail, and no one's files are lost, over its export."""
        try:
            return save_folder(distiller.student, distiller.pair.tokenizer, folder, overwrite=True)
        except FileExistsError as err:
            beside = folder.with_name(f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s Exporting to %s instead.", err, beside)
            return save_folder(distiller.student, distiller.pair.tokenizer, beside)

    def on_fit_end(self, trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        distiller = module.distiller
        if "before" not in self.results:  # no step to take (a finished run resumed): training never started
            self._score_start(trainer, distiller)
        Console().print("Scoring the distilled student...")
        self.results["after"] = self._score(distiller, self._items(trainer), "student", per_row=True)
        exported = None
        if self.export_dir is not None:
            exported = self._export(distiller, Path(trainer.log_dir or trainer.default_root_dir) / self.export_dir)
            _log_artifact(trainer.logger, exported)
        for name in ("before", "after", "teacher"):
            metrics = {f"report/{name}/{k}": v for k, v in self.results[name][0].items()}
            if trainer.logger is not None:
                trainer.logger.log_metrics(metrics, step=trainer.global_step)
        self._log_table(trainer, "samples/before", self.results["before"][1])
        self._log_table(trainer, "samples/after", self.results["after"][1])
        self.print_summary(trainer, exported)

    def print_summary(self, trainer, exported: Path | None) -> None:
        console = Console()
        table = Table(title=f"oprd: held-out results on {self.num_prompts} prompts (greedy)")
        for column in ("metric", "student before", "student after", "teacher"):
            table.add_column(column, justify="right" if column != "metric" else "left")
        before, after, teacher = (self.results[k][0] for k in ("before", "after", "teacher"))
        sampled = [name for name in after if name.startswith("accuracy_")]  # Avg@k, Best@k
        for name in ("accuracy", *sampled, "reverse_kl", "repetition", "distinct_4", "response_length"):
            if name in after:
                table.add_row(name, *(f"{m.get(name, float('nan')):.3f}" for m in (before, after, teacher)))
        console.print(table)
        pairs = zip(self.results["before"][1], self.results["after"][1], strict=True)
        for row_before, row_after in list(pairs)[: self.num_samples]:
            console.print(f"[bold]{row_before['prompt']}[/bold] (answer {row_before['answer']})")
            console.print(f"  before: {row_before['response']!r}")
            console.print(f"  after:  {row_after['response']!r}")
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", None) or "(no checkpoint callback)"
        console.print(f"checkpoint: {ckpt}")
        if exported is not None:
            console.print(f"exported student: {exported}  (AutoModelForCausalLM.from_pretrained loads it)")
        hint = wandb_hint(trainer.logger)
        if hint:
            console.print(f"W&B: {hint}")

    @staticmethod
    def _log_table(trainer, key: str, rows: list[dict[str, Any]]) -> None:
        logger = trainer.logger
        if not isinstance(logger, WandbLogger) or not rows or os.environ.get("WANDB_MODE") == "disabled":
            return
        columns = ["prompt", "response", "answer", "correct", "reverse_kl"]
        columns += ["teacher"] if any("teacher" in row for row in rows) else []  # several teachers: whose prompt
        logger.log_table(key, columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def _log_artifact(logger, folder: Path) -> None:
    """Upload the exported student as a W&B model artifact when the run is online."""
    if not wandb_online(logger):
        return
    import wandb

    artifact = wandb.Artifact("student", type="model")
    artifact.add_dir(str(folder))
    logger.experiment.log_artifact(artifact)


def _brief(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {metrics[name]:.3f}" for name in ("accuracy", "reverse_kl") if name in metrics)
