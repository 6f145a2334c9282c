import lightning as L
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from oprd.data import PromptDataModule
from oprd.evaluation.report import DistillReport
from tests.helpers import make_module


def test_report_scores_before_after_teacher_and_exports_a_loadable_student(tmp_path, capsys):
    module = make_module()
    report = DistillReport(num_prompts=6, num_samples=2, batch_size=3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[report],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, PromptDataModule(batch_size=2))
    out = capsys.readouterr().out
    assert "student before" in out and "accuracy" in out and "reverse_kl" in out and "exported student" in out
    before, after, teacher = (report.results[k][0] for k in ("before", "after", "teacher"))
    assert teacher["reverse_kl"] == 0 < before["reverse_kl"]  # the teacher scores its own answers at KL 0
    assert before["reverse_kl"] != after["reverse_kl"]
    assert all("reverse_kl" in row for row in report.results["after"][1])
    folder = tmp_path / "student"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt").input_ids
    ours = module.student.generate(ids, max_new_tokens=6, do_sample=False)
    theirs = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_a_folder_with_other_files_is_kept_and_the_student_exported_beside_it(tmp_path, caplog):
    mine = tmp_path / "student" / "config.json"
    mine.parent.mkdir()
    mine.write_text('{"mine": true}')  # e.g. a model saved there by hand, or by an oprd without export markers
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[DistillReport(num_prompts=2, num_samples=1, batch_size=2)])  # fmt: skip
    trainer.fit(make_module(), PromptDataModule(batch_size=2))
    assert mine.read_text() == '{"mine": true}'
    (beside,) = tmp_path.glob("student-*")
    assert (beside / "config.json").is_file() and "Exporting to" in caplog.text
