"""`projector: select`: parameter-free, each student channel against one teacher channel. A student pruned from its
teacher is matched with the channels it copied, read off the embeddings, without rollouts; any other is matched by
correlation, which recovers the channels a width-pruned student kept, equals the identity projector for a student
that is its teacher, is calibrated inside fit and saved; a wider student is refused before any weight loads."""

from __future__ import annotations

import csv

import pytest
import torch

from oprd.cli import main
from oprd.losses.hidden import HiddenLossConfig
from oprd.models import ModelSpec
from oprd.models.capture import HiddenCapture
from oprd.models.prune import prune_layers
from oprd.models.width import WidthPrune, importance, kept, prune_width, width_pruned_config
from oprd.objective.bridge import BridgeConfig
from oprd.objective.select import SelectProjectors, copied_channels, match_channels
from tests.helpers import ROOT, TEACHER, make_module, tiny_llama

PROMPTS = ["What is 1 plus 2?", "What is 3 plus 4?"]


def test_the_matching_is_one_to_one_and_takes_the_best_remaining_pair_first():
    scores = torch.tensor([[0.9, 0.8, 0.0], [0.95, 0.1, 0.2]])
    # (1, 0) is the best pair; row 0 then takes its best free column, 1 (0.8), not column 0 (0.9, taken).
    assert match_channels(scores).tolist() == [1, 0]
    assert match_channels(torch.eye(4)).tolist() == [0, 1, 2, 3]


def test_the_matching_recovers_the_channels_a_width_pruned_student_kept():
    teacher = tiny_llama(layers=2, width=32)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 384, (8, 24), generator=generator)
    mask = torch.ones_like(ids)
    scores = importance(teacher, ids, mask)
    student = prune_width(teacher, width_pruned_config(teacher.config, WidthPrune(hidden_size=16)), scores)
    rows = {}
    for name, model in (("student", student), ("teacher", teacher)):
        with torch.no_grad():
            states = HiddenCapture(model, [0, 1], stop_early=False).run(ids, mask)
        rows[name] = {f"{p}_{p}": states[p].flatten(0, 1) for p in (0, 1)}
    select = SelectProjectors([(0, 0), (1, 1)], 16, 32, BridgeConfig())
    report = select.calibrate(rows["student"], rows["teacher"])
    for label in ("0_0", "1_1"):
        assert select.channels(label).tolist() == kept(scores.channels, 16).tolist()
        assert report[label]["cosine"] > 0.9 and 0 < report[label]["explained"] < 1
    assert bool(select.calibrated) and not list(select.parameters())


def _embedding(model) -> torch.Tensor:
    return model.get_input_embeddings().weight


def test_the_copied_channels_of_a_pruned_student_are_read_off_the_embeddings():
    teacher = tiny_llama(layers=3, width=32)
    ids = torch.randint(3, 384, (8, 24), generator=torch.Generator().manual_seed(0))
    scores = importance(teacher, ids, torch.ones_like(ids))
    narrow = prune_width(teacher, width_pruned_config(teacher.config, WidthPrune(hidden_size=16)), scores)
    assert copied_channels(_embedding(narrow), _embedding(teacher)).tolist() == kept(scores.channels, 16).tolist()
    shallow = prune_layers(teacher, [0, 2])
    assert copied_channels(_embedding(shallow), _embedding(teacher)).tolist() == list(range(32))
    # in the teacher's dtype: a bfloat16 teacher's student loaded in float32 still holds its copies
    assert copied_channels(_embedding(shallow), _embedding(teacher).bfloat16()).tolist() == list(range(32))
    changed = _embedding(narrow).detach().clone()
    changed[5, 3] += 1e-3  # one value of one column trained away from its copy
    assert copied_channels(changed, _embedding(teacher)) is None
    assert copied_channels(_embedding(tiny_llama(width=32, seed=1)), _embedding(teacher)) is None  # its own weights
    assert copied_channels(_embedding(tiny_llama(width=16, vocab=256)), _embedding(teacher)) is None  # other vocab


@pytest.mark.parametrize(
    "pruned", [dict(keep_layers=[0, 2]), dict(width=WidthPrune(hidden_size=32, calibration_prompts=4))]
)
def test_select_on_a_student_pruned_from_its_teacher_compares_the_copied_channels_without_rollouts(pruned, monkeypatch):
    module = make_module(
        student=ModelSpec(config=TEACHER, seed=1, **pruned),  # the teacher's seed: its own weights, then pruned
        objective={"projector": "select", "hidden_loss": HiddenLossConfig(kind="mse")},
    )
    distiller = module.distiller

    def no_rollouts(*args, **kwargs):
        raise AssertionError("a pruned student's select sampled calibration rollouts")

    monkeypatch.setattr(distiller, "sample", no_rollouts)
    assert distiller.calibrate(PROMPTS, batch_size=2) == {"select/copied": 1.0}
    student, teacher = _embedding(distiller.student), _embedding(distiller.pair.teacher)
    projectors = distiller.objective.projectors
    for label in projectors.labels:
        assert torch.equal(student, teacher[:, projectors.channels(label)])
    assert not distiller.objective.needs_calibration


def _terms(module):
    roll = module.distiller.sample(PROMPTS, module.distiller.rollout, seed=0)
    student, teacher = module.distiller.states(roll, head=False)
    return module.objective(student, teacher, roll)


@pytest.mark.parametrize("kind", ["mse", "normalized_mse"])
def test_a_student_that_is_its_teacher_selects_every_channel_in_place_and_loses_as_identity_projectors(kind):
    same = ModelSpec(config=TEACHER, seed=1)
    loss = HiddenLossConfig(kind=kind)
    select = make_module(
        student=same, objective={"projector": "select", "bridge": BridgeConfig(batches=1), "hidden_loss": loss}
    )
    linear = make_module(student=same, objective={"hidden_loss": loss})  # identity-initialised Linear at equal widths
    select.distiller.calibrate(PROMPTS, batch_size=2)
    for label in select.objective.projectors.labels:
        assert select.objective.projectors.channels(label).tolist() == list(range(TEACHER["hidden_size"]))
    got, expected = _terms(select), _terms(linear)
    assert float(got.hidden.detach()) == 0.0
    torch.testing.assert_close(got.hidden, expected.hidden)


def test_select_is_calibrated_in_fit_logged_saved_and_not_redone_on_resume(tmp_path, caplog):
    def fit(steps: int, *flags: str) -> list[dict]:
        main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.objective.projector", "select",
              "--model.objective.bridge.batches", "1", "--trainer.max_steps", str(steps),
              "--trainer.limit_val_batches", "0",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.logger.init_args.version", f"v{steps}", "--trainer.enable_progress_bar", "false",
              *flags])  # fmt: skip
        return list(csv.DictReader((tmp_path / f"v{steps}" / "metrics.csv").open()))

    with caplog.at_level("INFO", logger="oprd"):
        rows = fit(2)
    assert caplog.text.count("select: matched the student's channels") == 1
    assert float(next(r for r in rows if r.get("select/cosine/1_3"))["select/cosine/1_3"]) > -1
    saved = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    channels = saved["objective.projectors.channels_1_3"]
    assert channels.shape == (32,) and len(set(channels.tolist())) == 32
    assert bool(saved["objective.projectors.calibrated"])
    assert not any(k.startswith("objective.") and v.is_floating_point() for k, v in saved.items())  # nothing learned
    caplog.clear()
    with caplog.at_level("INFO", logger="oprd"):
        fit(3, "--ckpt_path", "last")
    assert "select: matched" not in caplog.text


def test_a_wider_student_is_refused_before_any_model_loads(no_weight_loading):
    wide = ModelSpec(config={**TEACHER, "hidden_size": 128}, seed=2)
    with pytest.raises(ValueError, match="projector: select compares each of the student's 128 channels"):
        make_module(student=wide, objective={"projector": "select"})
