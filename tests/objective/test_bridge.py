"""OPRD-Bridge: the teacher basis is the PCA of the centred states, the student projector is a regression that
aligns a linear pair, the calibration is part of fit and of the checkpoint, and bad ranks are refused early."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from oprd.cli import main
from oprd.compare.probe import CompareProbe
from oprd.data import PromptDataModule, arithmetic_examples
from oprd.evaluation.report import DistillReport
from oprd.models import ModelSpec
from oprd.objective.bridge import BridgeConfig, BridgeProjectors, pca
from tests.helpers import ROOT, TEACHER, make_module, trainer

TINY = str(ROOT / "configs/tiny.yaml")
BRIDGE = ("--model.objective.projector", "bridge", "--model.objective.bridge.rank", "4",
          "--model.objective.bridge.batches", "2", "--model.objective.hidden_loss.kind", "normalized_mse",
          "--model.objective.hidden_weight", "10")  # fmt: skip


def test_the_teacher_basis_is_the_top_eigenvectors_of_the_centred_covariance():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 6, generator=generator) @ torch.randn(6, 6, generator=generator) + 3.0
    mean, basis, explained = pca(rows, 2)
    centred = rows.double() - rows.double().mean(0)
    covariance = centred.T @ centred / rows.shape[0]  # written out: the population covariance
    values, vectors = torch.linalg.eigh(covariance)
    torch.testing.assert_close(mean, rows.mean(0))
    for k in range(2):  # eigenvectors up to sign, largest eigenvalue first
        expected = vectors[:, -1 - k].float()
        assert torch.allclose(basis[:, k], expected, atol=1e-5) or torch.allclose(basis[:, k], -expected, atol=1e-5)
    assert explained == pytest.approx(float(values[-2:].sum() / values.sum()))


def test_the_calibrated_student_projector_aligns_a_linear_pair():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4000, 16, generator=generator) * torch.linspace(0.1, 30, 16)  # outlier dimensions too
    teacher = student @ torch.randn(16, 24, generator=generator) + 0.05 * torch.randn(4000, 24, generator=generator)
    bridge = BridgeProjectors([(0, 0)], 16, 24, BridgeConfig(rank=4))
    report = bridge.calibrate({"0_0": student}, {"0_0": teacher})
    assert report["0_0"]["cosine"] > 0.99 and bool(bridge.calibrated)
    projected = bridge({0: student[:100]})["0_0"]
    target = bridge.targets({0: teacher[:100]})["0_0"]
    assert torch.nn.functional.cosine_similarity(projected, target, dim=-1).mean() > 0.99
    assert not any(p.requires_grad for p in bridge.parameters())  # frozen unless bridge.train_projector


def test_invalid_ranks_are_refused_before_any_model_loads(no_weight_loading):
    with pytest.raises(ValueError, match=r"model.objective.bridge.rank = 65 exceeds the teacher's width 64: choose"):
        make_module(objective={"projector": "bridge", "bridge": BridgeConfig(rank=65)})
    with pytest.raises(ValueError, match="model.objective.bridge.rank must be >= 1"):
        make_module(objective={"projector": "bridge", "bridge": {"rank": 0}})


def _fit(root: Path, steps: int, *flags: str) -> list[str]:
    main(["fit", "--config", TINY, *BRIDGE, "--trainer.max_steps", str(steps), "--checkpoint.every_n_train_steps", "1",
          "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
          "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.version", f"v{len(flags)}",
          "--trainer.enable_progress_bar", "false", *flags])  # fmt: skip
    rows = list(csv.DictReader((root / f"v{len(flags)}" / "metrics.csv").open()))
    return rows


def test_calibration_runs_in_fit_is_checkpointed_and_a_resume_logs_the_same_losses(tmp_path, caplog):
    with caplog.at_level("INFO", logger="oprd"):
        reference = _fit(tmp_path / "reference", 4)
    assert caplog.text.count("Bridge calibrated on") == 1
    logged = next(r for r in reference if r.get("bridge/cosine/1_3"))
    assert 0 < float(logged["bridge/explained/1_3"]) <= 1 and float(logged["bridge/cosine/1_3"]) > 0
    expected = {int(r["step"]): r["train/loss"] for r in reference if r.get("train/loss")}

    _fit(tmp_path / "run", 2)
    caplog.clear()
    with caplog.at_level("INFO", logger="oprd"):
        resumed = _fit(tmp_path / "run", 4, "--ckpt_path", "last")
    assert "Bridge calibrated on" not in caplog.text  # restored from the checkpoint, not redone
    got = {int(r["step"]): r["train/loss"] for r in resumed if r.get("train/loss")}
    assert sorted(got) == [2, 3] and got == {s: expected[s] for s in got}
    final = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    reference_final = torch.load(tmp_path / "reference/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], v) for k, v in reference_final.items() if k.startswith("objective."))


def test_the_bridge_trains_a_narrower_student():
    student = ModelSpec(config={**TEACHER, "hidden_size": 32, "num_hidden_layers": 2}, seed=2)
    module = make_module(student=student, objective={"projector": "bridge", "bridge": BridgeConfig(rank=4, batches=1)})
    assert module.objective.needs_calibration
    assert module.objective.projectors.student["1_3"].weight.shape == (4, 32)


def test_the_probe_and_the_report_score_the_student_with_a_calibrated_bridge_and_time_the_calibration(tmp_path):
    # An uncalibrated Bridge has a zero teacher basis: every target is 0, so it scores cosine exactly 0 and
    # normalised error exactly 1 whatever the student. What trains is the calibrated Bridge: score that one.
    probe = CompareProbe({"test": arithmetic_examples("val")[:2]}, every=100, batch_size=2)
    report = DistillReport(num_prompts=2, num_samples=0, export_dir=None, batch_size=2)
    bridge = BridgeConfig(rank=4, batches=1)
    objective = {
        "projector": "bridge",
        "bridge": bridge,
        "hidden_weight": 10.0,
        "hidden_loss": {"kind": "normalized_mse"},
    }
    module = make_module(objective=objective)
    trainer(tmp_path, max_steps=1, callbacks=[probe, report]).fit(module, PromptDataModule(batch_size=2))
    start = probe.rows[0]
    assert start["step"] == 0 and start["cos"] > 0
    before = report.results["before"][0]
    assert before["cos/1_3"] > 0
    # Calibrating is training time (a user waits for it): the clock at step 0 is the calibration.
    assert probe.calibrate_s > 0 and start["train_s"] == probe.calibrate_s
