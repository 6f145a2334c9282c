"""On-policy rollouts: sampling settings and the sampled batch (`sampling`), and the engines that sample (`engine`)."""

from oprd.rollout.engine import ENGINES, HFGenerateEngine, RolloutEngine, get_engine, register_engine
from oprd.rollout.sampling import Rollout, RolloutConfig, eos_ids, response_mask, rollout

__all__ = [
    "ENGINES",
    "HFGenerateEngine",
    "Rollout",
    "RolloutConfig",
    "RolloutEngine",
    "eos_ids",
    "get_engine",
    "register_engine",
    "response_mask",
    "rollout",
]
