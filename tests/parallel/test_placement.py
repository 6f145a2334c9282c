"""Teacher placement: another device, or CPU offload between passes; results never change.

On a CPU-only machine every device is the CPU, so the moves themselves are checked by recording what the placement
asks for (with a pretend CUDA student); the real moves run in tests/test_gpu.py when CUDA is available.
"""

from __future__ import annotations

import pytest
import torch

import oprd.parallel.placement
from oprd.losses.token import TokenLossConfig
from oprd.parallel.placement import TeacherPlacement
from tests.helpers import make_module

CUDA = torch.device("cuda", 0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="exclude each other"):
        TeacherPlacement(device="cpu", offload=True)
    with pytest.raises(RuntimeError):
        TeacherPlacement(device="no-such-device")
    with pytest.raises(ValueError, match="model.teacher_placement.shard spreads the teacher"):
        make_module(teacher_placement={"shard": True, "offload": True})


def test_where_the_teacher_rests_and_computes():
    default, other, offload = TeacherPlacement(), TeacherPlacement(device="cuda:1"), TeacherPlacement(offload=True)
    assert default.rest_device(CUDA) == default.compute_device(CUDA) == CUDA
    assert other.rest_device(CUDA) == other.compute_device(CUDA) == torch.device("cuda", 1)
    assert offload.rest_device(CUDA) == torch.device("cpu") and offload.compute_device(CUDA) == CUDA


def test_offload_moves_the_teacher_in_for_its_pass_and_back_after(monkeypatch):
    moves = []
    monkeypatch.setattr(oprd.parallel.placement, "_move", lambda module, device: moves.append(device))
    teacher = torch.nn.Linear(2, 2)
    with TeacherPlacement(offload=True).active(teacher, CUDA) as device:
        assert device == CUDA and moves == [CUDA]
    assert moves == [CUDA, torch.device("cpu")]
    moves.clear()
    with pytest.raises(KeyError), TeacherPlacement(offload=True).active(teacher, CUDA):
        raise KeyError  # a failing pass still returns the teacher to the CPU
    assert moves == [CUDA, torch.device("cpu")]
    moves.clear()
    with TeacherPlacement().active(teacher, CUDA):
        pass
    assert moves == [CUDA]  # not offloaded: it stays on the device


@pytest.mark.parametrize("placement", [{"offload": True}, {"device": "cpu"}])
def test_placement_leaves_states_losses_and_gradients_unchanged(placement):
    token = TokenLossConfig(objective="reverse_kl", estimator="exact")
    objective = {"token_loss": token}
    plain, placed = make_module(objective=objective), make_module(objective=objective, teacher_placement=placement)
    roll = plain.distiller.sample(["What is 1 plus 2?", "Hi"], plain.distiller.rollout, seed=0)
    results = []
    for module in (plain, placed):
        teacher = module.pair.teacher_states(roll, module.objective.points("teacher"))
        terms = module.distiller.distill(roll, teacher=teacher)
        terms.loss.backward()
        grads = [p.grad for p in module.student.parameters() if p.grad is not None]
        results.append((teacher, terms, grads))
        assert next(module.pair.teacher.parameters()).device.type == "cpu"
    (t0, l0, g0), (t1, l1, g1) = results
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert torch.equal(l0.loss, l1.loss) and torch.equal(l0.token, l1.token)
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_teacher_head_is_copied_to_the_student_device_only_when_elsewhere():
    module = make_module()
    head = module.pair.teacher.get_output_embeddings()
    assert TeacherPlacement().head(module.pair.teacher, torch.device("cpu")).weight is head.weight  # not copied
    moved = TeacherPlacement(offload=True).head(module.pair.teacher, torch.device("meta"))
    assert moved.weight.device.type == "meta" and moved.weight.shape == head.weight.shape
