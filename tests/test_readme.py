"""Every `oprd` command the README shows runs as written, on the tiny config, and does what the README says.

Commands are read from the README's bash blocks and run in one fresh folder, in which the README's first `fit` has
written `runs/tiny/checkpoints/last.ckpt` before any of them, so each command's test stands alone. The model configs
become `configs/tiny.yaml` (seconds instead of minutes), fits are cut to a few steps, and commands that need GPUs or a
cluster are left out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from oprd.training.memory import KINDS
from tests.helpers import ROOT

# Under xdist the module runs on one worker, so its module-scoped fixture (a fit) is built once.
pytestmark = pytest.mark.xdist_group("readme")

OPRD = os.path.join(os.path.dirname(sys.executable), "oprd")
NEEDS_HARDWARE = ("accelerator gpu", "torchrun", "srun", "--trainer.num_nodes")


def readme_commands() -> list[str]:
    """The `oprd ...` lines of the README's bash blocks, with continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"(\.venv/bin/)?oprd ", line) and not any(word in line for word in NEEDS_HARDWARE):
                commands.append(line)
    return commands


def on_tiny(command: str) -> list[str]:
    """The command on the tiny config, the venv's `oprd`, a short fit."""
    command = re.sub(r"configs/(quickstart|pruned|compress)\.yaml|my\.yaml", "configs/tiny.yaml", command)
    command = command.replace("runs/quickstart/", "runs/tiny/")
    words = shlex.split(command)
    words[0] = OPRD
    words = [str(ROOT / w) if w.startswith("configs/") else w for w in words]
    if words[1] == "fit" and "--help" not in words and "--print_config" not in words:
        words += ["--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false"]
    return words


def test_the_readme_says_what_compares_memory_column_measures():
    text = " ".join((ROOT / "README.md").read_text().split())
    section = text[text.index("`oprd compare` trains the same student") :]
    section = section[: section.index("## ")]
    for label in KINDS.values():  # the words the table's caption uses, so a reader can tell which one it is
        assert f"`{label}`" in section
    assert "above what was allocated when it began" in section and "not in it" in section


def test_the_readme_shows_every_subcommand():
    shown = {shlex.split(c)[1] for c in readme_commands()}
    assert {"fit", "validate", "predict", "export", "compare"} <= shown


def run_in(folder, command: str) -> tuple[int, str]:
    """Run a README command on the tiny config in `folder`: its exit code and output (with the checkpoints there)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(on_tiny(command), cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*.ckpt"))
    return run.returncode, f"{command}\n{run.stdout + run.stderr}\ncheckpoints in the folder: {files}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with the held-out file the README names and the checkpoint of its first `fit`."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "heldout.jsonl").write_text(
        "".join(f'{{"prompt": "What is {a} plus {a + 3}?", "answer": "{2 * a + 3}"}}\n' for a in range(1, 5))
    )
    first_fit = next(c for c in readme_commands() if shlex.split(c)[1] == "fit")
    code, output = run_in(folder, first_fit)
    assert code == 0, output[-3000:]
    return folder


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_and_does_what_it_says(command, folder):
    code, output = run_in(folder, command)
    assert code == 0, output[-3000:]
    words = shlex.split(command)
    if "--help" in words:
        assert "--model.optim.lr" in output
    elif "--print_config" in words:
        assert "model:" in output and "trainer:" in output
    elif words[1] == "fit":
        assert (folder / "runs/tiny/checkpoints/last.ckpt").is_file()
    elif words[1] == "validate":
        assert "val/reverse_kl" in output and "val/accuracy" in output
    elif words[1] == "predict":
        assert (folder / "runs/tiny/predictions.jsonl").read_text().count("\n") >= 1
    elif words[1] == "compare":
        assert (folder / "runs/compare/compare.json").is_file() and "oprd compare:" in output
    elif words[1] == "export":
        out = words[words.index("--out") + 1]
        assert (folder / out / "config.json").is_file() and (folder / out / "model.safetensors").is_file()
