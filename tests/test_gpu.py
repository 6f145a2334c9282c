"""CUDA-only checks: a bf16 teacher, teacher placement with real moves, peak-memory logging.

Marked `gpu` and skipped without CUDA (run them with `pytest -m gpu` on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from oprd.data import PromptDataModule
from oprd.models import ModelSpec
from tests.helpers import TEACHER, make_module, trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = ["What is 1 plus 2?", "Hi there"]


def test_bf16_teacher_trains_on_cuda_and_logs_peak_memory(tmp_path):
    module = make_module(teacher=ModelSpec(config=TEACHER, seed=1, dtype="bfloat16"))
    t = trainer(tmp_path, accelerator="gpu", devices=1, max_steps=2)
    t.fit(module, PromptDataModule(batch_size=2))
    param = next(module.pair.teacher.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
    assert torch.isfinite(t.logged_metrics["train/loss"])
    assert float(t.logged_metrics["train/peak_memory_gb"]) > 0


@pytest.mark.parametrize("placement", [{"offload": True}, {"device": "cpu"}])
def test_teacher_placement_moves_weights_and_keeps_results(placement):
    plain, placed = make_module().cuda(), make_module(teacher_placement=placement).cuda()
    roll = plain.distiller.sample(PROMPTS, plain.distiller.rollout, seed=0)
    points = plain.objective.points("teacher")
    expected, got = plain.pair.teacher_states(roll, points), placed.pair.teacher_states(roll, points)
    assert next(placed.pair.teacher.parameters()).device.type == "cpu"  # offloaded after the pass, or living there
    for key, value in expected.items():
        assert got[key].device == value.device
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4)


def test_cuda_update_memory_is_the_peak_above_the_start_over_every_window():
    from oprd.training.memory import UpdateMemory

    device = torch.device("cuda")
    resident = torch.ones(64 * 2**20, dtype=torch.uint8, device=device)  # weights and the like: not charged
    memory = UpdateMemory(device)
    memory.begin()
    kept = torch.ones(2 * 2**20, dtype=torch.uint8, device=device)  # lives on into the next window (a gradient)
    memory.end()
    between = torch.ones(32 * 2**20, dtype=torch.uint8, device=device)  # a rollout's KV cache, freed before the update
    del between
    memory.begin()
    torch.ones(8 * 2**20, dtype=torch.uint8, device=device)  # a temporary of the second window
    memory.end()
    # The caching allocator rounds each block up to 2 MiB multiples: both sizes here are multiples already.
    assert memory.close() == 10 * 2**20
    del kept, resident
