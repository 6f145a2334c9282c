"""The private Lightning members oprd relies on, where no public API covers them: these tests fail first if they go.

pyproject.toml pins Lightning to the range in which it exists.
"""

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy

from oprd.evaluation.report import AutoWandbLogger
from oprd.parallel.sharding import FSDP2Strategy


def test_model_parallel_strategy_keeps_its_data_parallel_size_until_setup():
    # FSDP2Strategy sets it to the world size in `setup_environment`, the first moment the world size is known.
    assert ModelParallelStrategy(data_parallel_size="auto")._data_parallel_size == "auto"
    strategy = FSDP2Strategy()
    assert strategy._data_parallel_size == "auto" and strategy._tensor_parallel_size == 1


def test_wandb_logger_keeps_its_init_arguments_and_ours_drops_the_unset_anonymous(tmp_path):
    # AutoWandbLogger removes the `anonymous=None` that WandbLogger adds, which W&B warns about on every run.
    assert WandbLogger(save_dir=tmp_path, offline=True)._wandb_init["anonymous"] is None
    assert "anonymous" not in AutoWandbLogger(save_dir=tmp_path, offline=True)._wandb_init
    assert AutoWandbLogger(save_dir=tmp_path, anonymous=True)._wandb_init["anonymous"] == "allow"
