"""`oprd export`: the checkpointed student as a Hugging Face folder that loads and generates the same tokens."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from oprd.cli import main
from oprd.data import format_prompts
from oprd.models import ModelSpec, load_config, load_model
from oprd.module import DistillModule
from oprd.rollout import RolloutConfig
from tests.helpers import ROOT

# Under xdist the module runs on one worker: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("export")

PROMPTS = ["What is 3 plus 4?", "Hello! How can I help you today?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`last.ckpt` of a 3-step tiny run through the CLI (hyper-parameters stored as `oprd fit` stores them)."""
    root = tmp_path_factory.mktemp("fit")
    main([
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
        "--model.optim.warmup_steps", "0",
    ])  # fmt: skip
    return root / "checkpoints/last.ckpt"


def test_export_loads_and_generates_what_the_checkpointed_student_generates(checkpoint, tmp_path):
    out = tmp_path / "student"
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(out)])
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    module = DistillModule.load_from_checkpoint(checkpoint, map_location="cpu")

    trained = module.student.state_dict()
    assert exported.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())
    spec = module.hparams.student
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    untrained = load_model(spec, load_config(spec, len(tokenizer)))
    fresh = untrained.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(fresh, exported.model.layers[0].mlp.up_proj.weight)  # the trained weights, not a fresh init
    assert tokenizer.get_vocab() == module.pair.tokenizer.get_vocab()
    assert tokenizer.chat_template == module.pair.tokenizer.chat_template
    assert exported.generation_config.eos_token_id == tokenizer.eos_token_id  # stops where training rollouts stop

    # A user's greedy `generate` on the export, with its saved defaults (EOS, pad), answers like the module's student.
    enc = format_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        tokens = exported.generate(**enc, do_sample=False, max_new_tokens=12)
    expected = module.distiller.sample(PROMPTS, RolloutConfig(max_new_tokens=12, do_sample=False)).input_ids
    assert torch.equal(tokens, expected)


def test_export_refuses_a_non_empty_folder_unless_asked(checkpoint, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("my model")
    with pytest.raises(FileExistsError, match="not empty"):
        main(["export", "--ckpt_path", str(checkpoint), "--out", str(out), "--debug"])
    assert (out / "notes.txt").read_text() == "my model"
    # --overwrite replaces an earlier export only, never other files.
    with pytest.raises(FileExistsError, match=r"holds files that no `oprd export` wrote \(notes\.txt\)"):
        main(["export", "--ckpt_path", str(checkpoint), "--out", str(out), "--overwrite", "--debug"])
    assert (out / "notes.txt").read_text() == "my model"
    (out / "notes.txt").unlink()
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(out)])
    first = (out / "model.safetensors").stat().st_mtime_ns
    main(["export", "--ckpt_path", str(checkpoint), "--out", str(out), "--overwrite"])
    assert (out / "config.json").exists() and (out / "model.safetensors").stat().st_mtime_ns > first
    assert not [p for p in tmp_path.iterdir() if p.name != "student"]  # no staging or retired folder left behind


def test_export_overwrite_never_deletes_the_checkpoint_it_exports(checkpoint, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    source = run / "checkpoints/last.ckpt"
    source.write_bytes(checkpoint.read_bytes())
    with pytest.raises(FileExistsError, match=r"checkpoints/last\.ckpt"):
        main(["export", "--ckpt_path", str(source), "--out", str(run), "--overwrite", "--debug"])
    assert source.read_bytes() == checkpoint.read_bytes()


def test_export_errors_name_the_problem(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "a"), "--debug"])
    # A config whose student is narrower than the checkpoint's: the shapes are named, nothing is written.
    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config["model"]["student"]["config"]["hidden_size"] = 16
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump(config))
    shapes = r"model\.embed_tokens\.weight is \[384, 32\] in checkpoint .* but \[384, 16\]"
    with pytest.raises(ValueError, match=shapes):
        main(["export", "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "b"), "--config", str(narrow),
              "--debug"])  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_export_is_listed_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "export" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--overwrite" in capsys.readouterr().out
