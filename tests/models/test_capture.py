import pytest
import torch

from oprd.models.capture import NORM, HiddenCapture, resolve_point
from oprd.models.layers import decoder, find_final_norm, find_layers
from tests.helpers import tiny_llama, tiny_qwen3


@torch.no_grad()
def count_layer_calls(model, fn) -> list[int]:
    """How many times each decoder layer ran during `fn()`."""
    layers = find_layers(model)
    counts = [0] * len(layers)
    handles = [
        layer.register_forward_pre_hook(lambda module, args, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _inputs(vocab=384, b=2, t=9):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    return ids, mask


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3])
def test_capture_equals_output_hidden_states(build):
    model = build(layers=4)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = HiddenCapture(model, [0, 1, 2, -1, NORM], stop_early=False).run(ids, mask)
    for layer in range(3):  # hidden_states[i + 1] is layer i's output, except the last, which is normed
        assert torch.equal(states[layer], ref[layer + 1])
    assert torch.equal(states[NORM], ref[4])
    assert torch.equal(find_final_norm(model)(states[3]), ref[4])
    assert not torch.equal(states[3], states[NORM])


def test_truncated_pass_runs_only_needed_layers():
    model = tiny_llama(layers=5)
    ids, mask = _inputs()
    capture = HiddenCapture(model, [0, 2], stop_early=True)
    counts = count_layer_calls(model, lambda: capture.run(ids, mask))
    assert counts == [1, 1, 1, 0, 0]
    full = HiddenCapture(model, [0, 2], stop_early=False)
    assert count_layer_calls(model, lambda: full.run(ids, mask)) == [1] * 5


def test_truncated_states_equal_full_pass():
    model = tiny_llama(layers=5)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = HiddenCapture(model, [1, 2]).run(ids, mask)
    assert torch.equal(states[2], ref[3]) and torch.equal(states[1], ref[2])


def test_tuple_outputs_and_idempotent_storage():
    model = tiny_llama(layers=2)
    capture = HiddenCapture(model, [0], stop_early=False)
    hidden = torch.randn(1, 3, 32)
    with capture.capture() as states:
        layer = capture.layers[0]
        for output in (hidden * 2, (hidden, None)):  # tensor (transformers >= 4.54) and tuple (older) outputs
            layer._forward_hooks[next(iter(layer._forward_hooks))](layer, (), output)
        assert list(states) == [0] and torch.equal(states[0], hidden)  # second call overwrote the first


def test_hooks_removed_on_exit_and_on_exception():
    model = tiny_llama(layers=3)
    capture = HiddenCapture(model, [1, NORM])
    with pytest.raises(RuntimeError, match="boom"):
        with capture.capture():
            assert len(capture.layers[1]._forward_hooks) == 1
            raise RuntimeError("boom")
    assert all(len(layer._forward_hooks) == 0 for layer in capture.layers)
    assert len(find_final_norm(model)._forward_hooks) == 0
    capture.run(*_inputs())
    assert capture.states == {}  # released after each pass
    assert all(len(layer._forward_hooks) == 0 for layer in capture.layers)


def test_captured_tensors_are_released_every_step():
    model = tiny_llama(layers=2)
    capture = HiddenCapture(model, [0, 1])
    ids, mask = _inputs()
    import weakref

    refs = []
    for _ in range(3):
        states = capture.run(ids, mask)
        refs.append(weakref.ref(states[0]))
        del states
    assert all(ref() is None for ref in refs)


def test_gradient_checkpointing_reruns_are_harmless():
    model = tiny_llama(layers=3).train()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; before: gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = _inputs()
    states = HiddenCapture(model, [1]).run(ids, mask)
    states[1].pow(2).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_find_layers_by_path_and_errors():
    model = tiny_llama(layers=2)
    assert find_layers(model, "model.layers") is model.model.layers
    assert find_layers(model) is model.model.layers
    assert decoder(model) is model.model
    with pytest.raises(ValueError, match="No module at layers path"):
        find_layers(model, "model.blocks")
    with pytest.raises(ValueError, match="not a ModuleList"):
        find_layers(model, "model.norm")


def test_resolve_point():
    assert resolve_point(-1, 4) == 3
    assert resolve_point("2", 4) == 2
    assert resolve_point("norm", 4) == NORM
    with pytest.raises(ValueError, match="out of range for the teacher, which has 4"):
        resolve_point(4, 4, "teacher")
    with pytest.raises(ValueError, match="layer index or 'norm'"):
        resolve_point("final", 4)
