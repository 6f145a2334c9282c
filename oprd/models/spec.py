"""Model references: Hugging Face ids, local folders, built-in aliases, or random models built from a config.

Configs are resolved first and validated (layer map, vocabulary) before any weights are loaded, so a bad config
fails in seconds, not after the teacher has loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from oprd.models.aliases import aliases
from oprd.models.depth import DepthPrune, block_influence, most_influential
from oprd.models.layers import pruned_config
from oprd.models.lora import LoraSettings, add_lora
from oprd.models.prune import check_keep_layers, every_kth, prune_layers
from oprd.models.width import WidthPrune, importance, prune_width, width_pruned_config

log = logging.getLogger(__name__)

# float64 is for checks that two orders of the same computation agree (data parallel vs one process, accumulation vs
# one micro-batch): float32 round-off, which Adam can amplify, would decide such a check, not the code under test.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ModelSpec:
    """Where a teacher or student comes from."""

    path: str | None = None
    """Hugging Face id (`Qwen/Qwen3-0.6B`), local folder, or built-in alias (`smollm2-135m-instruct`)."""
    config: dict[str, Any] | None = None
    """Instead of `path`: transformers config fields (with `model_type`) of a randomly initialised model."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16, or float64 (exact-comparison tests; slow)."""
    seed: int = 0
    """Seed of the random initialisation when built from `config`."""
    keep_layers: list[int] | None = None
    """Depth-prune: keep only these decoder layers (e.g. [0, 2, 4]); pair with `layer_map: pruned`."""
    keep_every: int | None = None
    """Depth-prune: keep every k-th decoder layer (0, k, 2k, ...); pair with `layer_map: pruned`."""
    width: WidthPrune | None = None
    """Width-prune: fewer hidden channels, attention heads or MLP neurons, ranked by activation (Minitron); applied
    after depth pruning."""
    depth: DepthPrune | None = None
    """Depth-prune by importance: keep the `num_layers` decoder layers of highest block influence on calibration
    prompts (ShortGPT); the chosen layers are written to `keep_layers` (logged, and saved with the run)."""
    lora: LoraSettings | None = None
    """Train a LoRA adapter (peft) instead of every weight: only the adapter is trained and checkpointed."""
    layers_path: str | None = None
    """Dotted path to the decoder layers when oprd cannot find them (e.g. `model.layers`)."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("A model needs exactly one of `path` (id, folder or built-in alias) or `config`.")
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("A model built from `config` needs `model_type` (e.g. llama, qwen3, mistral).")
        if self.keep_layers is not None and self.keep_every is not None:
            raise ValueError("Give `keep_layers` or `keep_every`, not both.")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be at least 1 (2 keeps every other layer), got {self.keep_every}.")
        if isinstance(self.width, dict):  # the YAML round-trip of a checkpoint's hyper-parameters
            self.width = WidthPrune(**self.width)
        if isinstance(self.depth, dict):
            self.depth = DepthPrune(**self.depth)
        if self.depth is not None and self.keep_every is not None:
            raise ValueError("Give `depth` (layers chosen by importance) or `keep_every`, not both.")
        if self.depth is not None and self.keep_layers is not None and len(self.keep_layers) != self.depth.num_layers:
            raise ValueError(
                f"keep_layers holds {len(self.keep_layers)} layers but depth.num_layers is {self.depth.num_layers}: "
                "drop keep_layers to choose them by importance again."
            )
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)

    @property
    def pruned(self) -> bool:
        return self.keep_layers is not None or self.keep_every is not None

    def kept_layers(self, num_layers: int) -> list[int] | None:
        """The kept decoder layers of a depth-pruned model, validated against the unpruned depth."""
        if self.keep_every is not None:
            return every_kth(num_layers, self.keep_every)
        return None if self.keep_layers is None else check_keep_layers(list(self.keep_layers), num_layers)

    def describe(self) -> str:
        return self.path or f"random {self.config['model_type']} {self.config}"


def local_path(spec: ModelSpec) -> str:
    """The folder or hub id to load from, building a built-in alias on first use.

    A path that looks local (`./x`, `/x`, `~/x`, `a/b/c`, or `a/b` where `a` is a local folder) but does not exist is
    refused at once: treated as a hub id it would retry the network before saying anything useful.
    """
    known = aliases()
    if spec.path in known:
        return str(known[spec.path].resolve(spec.path))
    path = Path(spec.path).expanduser()
    if not path.exists() and _looks_local(spec.path):
        raise ValueError(
            f"Model folder {spec.path} does not exist; check the path (or use a hub id such as "
            f"`HuggingFaceTB/SmolLM2-135M-Instruct`, or a built-in alias: {', '.join(known)})."
        )
    return spec.path


def _looks_local(name: str) -> bool:
    # A hub id is `name` or `owner/name`; anything else with a path shape is meant as a folder.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def load_config(spec: ModelSpec, vocab_size: int | None = None) -> PretrainedConfig:
    """The model's config, without loading weights (random models get the tokenizer's vocab size by default)."""
    if spec.config is not None:
        fields = dict(spec.config)
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
    else:
        try:
            config = AutoConfig.from_pretrained(local_path(spec), trust_remote_code=spec.trust_remote_code)
        except OSError as err:
            raise ValueError(f"Cannot load the config of model {spec.path!r}: {err}") from err
    if spec.width is not None:
        config = width_pruned_config(config, spec.width)
    keep = spec.kept_layers(config.num_hidden_layers)
    return config if keep is None else pruned_config(config, keep)


def load_model(spec: ModelSpec, config: PretrainedConfig, tokenizer=None) -> torch.nn.Module:
    """Load (or randomly build) the causal LM described by `spec`, width- and depth-pruned when it asks for that.

    Args:
        config: the (possibly pruned) config from `load_config`; a pruned model is loaded whole, then pruned.
        tokenizer: formats the calibration prompts that rank what width pruning keeps (needed only then).
    """
    dtype = DTYPES[spec.dtype]
    keep = pruned_from(spec, config.vocab_size)
    full_config = config if keep is None and spec.width is None else load_config(_unpruned(spec), config.vocab_size)
    if spec.config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = AutoModelForCausalLM.from_config(copy.deepcopy(full_config), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            local_path(spec), config=full_config, dtype=dtype, trust_remote_code=spec.trust_remote_code
        )
    if keep is not None:
        model = prune_layers(model, keep, spec.layers_path)
    if spec.width is not None:  # ranked on the layers the model keeps
        model = _prune_width(model, spec, tokenizer)
    if spec.lora is not None:
        model = add_lora(model, spec.lora, spec.seed)
    log.info("Loaded %s (%.1fM parameters)", spec.describe(), sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _unpruned(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, keep_layers=None, keep_every=None, width=None, depth=None)


def choose_depth(spec: ModelSpec, tokenizer) -> ModelSpec:
    """`spec` with the layers its `depth` asks for chosen: ranked by block influence on the unpruned model over the
    calibration prompts, written to `keep_layers`. A spec without `depth`, or whose layers are already chosen (a
    resumed run's), is returned as it is."""
    from oprd.data import format_prompts

    if spec.depth is None or spec.keep_layers is not None:
        return spec
    full = _unpruned(spec)
    model = load_model(full, load_config(full, len(tokenizer)), tokenizer)
    batch = format_prompts(tokenizer, calibration_prompts(spec.depth))
    scores = block_influence(model, batch["input_ids"], batch["attention_mask"], spec.layers_path)
    keep = most_influential(scores, spec.depth.num_layers)
    del model
    log.info(
        "Depth pruning %s by block influence on %d calibration prompts: keeps layers %s of %d (influence %s).",
        spec.describe(), len(batch["input_ids"]), keep, len(scores), [round(float(s), 3) for s in scores],
    )  # fmt: skip
    return dataclasses.replace(spec, keep_layers=keep)


def calibration_prompts(width: WidthPrune | DepthPrune) -> list[str]:
    """The prompts whose activations rank what width (or depth) pruning keeps: the first `calibration_prompts` of the
    training split of `calibration` (Minitron calibrates on training data; held-out prompts must stay unseen)."""
    from oprd.data import load_prompts

    seed = 0 if width.calibration_seed is None else width.calibration_seed
    num_val = 100 if width.calibration_num_val is None else width.calibration_num_val
    items = load_prompts(width.calibration or "arithmetic", "train", seed=seed, num_val=num_val)
    return [item["prompt"] for item in items[: width.calibration_prompts]]


def _prune_width(model: torch.nn.Module, spec: ModelSpec, tokenizer) -> torch.nn.Module:
    """Rank channels, heads and neurons on the calibration prompts, then keep the most important."""
    from oprd.data import format_prompts

    if tokenizer is None:
        raise ValueError("Width pruning needs a tokenizer for its calibration prompts.")
    batch = format_prompts(tokenizer, calibration_prompts(spec.width))
    scores = importance(model, batch["input_ids"], batch["attention_mask"])
    pruned = prune_width(model, width_pruned_config(model.config, spec.width), scores)
    log.info("Width-pruned %s on %d calibration prompts.", spec.describe(), len(batch["input_ids"]))
    return pruned


def pruned_from(spec: ModelSpec, vocab_size: int | None = None) -> list[int] | None:
    """The teacher-side indices of the layers a depth-pruned model keeps; None when it is not pruned."""
    if not spec.pruned:
        return None
    return spec.kept_layers(load_config(_unpruned(spec), vocab_size).num_hidden_layers)
