"""The one private Lightning member oprd relies on, where no public API covers it: this test fails first if it goes.

pyproject.toml pins Lightning to the range in which it exists.
"""

from lightning.pytorch.strategies import ModelParallelStrategy

from oprd.parallel.sharding import FSDP2Strategy


def test_model_parallel_strategy_keeps_its_data_parallel_size_until_setup():
    # FSDP2Strategy sets it to the world size in `setup_environment`, the first moment the world size is known.
    assert ModelParallelStrategy(data_parallel_size="auto")._data_parallel_size == "auto"
    strategy = FSDP2Strategy()
    assert strategy._data_parallel_size == "auto" and strategy._tensor_parallel_size == 1
