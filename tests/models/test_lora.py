"""LoRA students through peft: hooks reach the layers inside the wrapper, only adapters train and are checkpointed,
and the export is the merged model (or the adapter alone)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from oprd.data import PromptDataModule
from oprd.export import export_checkpoint
from oprd.models import ModelSpec, load_config, load_model
from oprd.models.lora import LoraSettings, is_lora
from oprd.module import DistillModule
from tests.helpers import STUDENT, make_module, trainer

# Under xdist the module runs on one worker: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("lora")

LORA = ModelSpec(config=STUDENT, seed=2, lora=LoraSettings(r=4, alpha=8))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA student after 3 steps, its checkpoint, and its weights before training."""
    root = tmp_path_factory.mktemp("lora")
    module = make_module(student=LORA)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    fit = trainer(root, max_steps=3)
    fit.fit(module, PromptDataModule(batch_size=2))
    fit.save_checkpoint(root / "lora.ckpt")
    return module, root / "lora.ckpt", before


def test_only_the_adapters_train_through_the_wrapped_layers(trained):
    module, _, before = trained
    assert is_lora(module.student)
    after = module.student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all("lora_" in k for k in changed)  # the adapters moved, through hooks inside the wrapper
    assert {k for k in changed if "layers.1." in k}  # the deepest mapped layer's adapters too
    trainable = [n for n, p in module.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_the_checkpoint_holds_adapters_and_projectors_only_and_restores_them(trained):
    module, path, _ = trained
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    students = [k for k in state if k.startswith("student.")]
    assert students and all("lora_" in k for k in students)
    assert any(k.startswith("objective.projectors.") for k in state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = DistillModule.load_from_checkpoint(path)
    assert not [w for w in caught if "not in the checkpoint" in str(w.message)]  # the base comes from its model path
    mine = module.state_dict()
    assert all(torch.equal(restored.state_dict()[k], mine[k]) for k in mine)


def test_export_writes_the_merged_model_or_the_adapter(trained, tmp_path):
    module, path, _ = trained
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.student(ids).logits
    folder = export_checkpoint(path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in k for k in merged.state_dict())
    # Merged, W + s BA is rounded once to float32 instead of x W + s x B A summed: per dot product of n <= 64 terms at
    # most ~n u (u = 6e-8) of its scale, ~4e-6, through the student's 2 layers ~1e-5 of the logits (~0.1-1). rtol 1e-4
    # with atol 1e-5 bounds that worst case; the errors seen are ~1e-7.
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
    adapter = export_checkpoint(path, tmp_path / "adapter", adapter=True)
    from peft import PeftModel

    base = load_model(ModelSpec(config=STUDENT, seed=2), load_config(ModelSpec(config=STUDENT, seed=2), 384))
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base, adapter).eval()(ids).logits, expected)


def test_bad_lora_settings_are_refused(tmp_path):
    from oprd.export import save_folder

    with pytest.raises(ValueError, match="lora.r must be >= 1"):
        LoraSettings(r=0)
    module = make_module()
    with pytest.raises(ValueError, match="--adapter exports a LoRA student's adapter"):
        save_folder(module.student, module.pair.tokenizer, tmp_path / "unused", adapter=True)
    assert not list(tmp_path.iterdir())  # refused before anything is written
