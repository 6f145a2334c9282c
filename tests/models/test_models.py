import pytest
import torch

from oprd.models import (
    ModelSpec,
    check_same_tokenizer,
    check_vocab,
    load_config,
    load_model,
    pruned_from,
    tiny_tokenizer,
)
from oprd.objective.layer_map import resolve_layer_map

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def test_random_models_are_seeded_and_take_the_tokenizer_vocab():
    spec = ModelSpec(config=LLAMA, seed=3)
    config = load_config(spec, vocab_size=384)
    assert config.vocab_size == 384 and config.num_hidden_layers == 6
    a, b = load_model(spec, config), load_model(spec, config)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_pruned_student_keeps_the_teacher_layers_it_names():
    teacher_spec = ModelSpec(config=LLAMA, seed=3)
    teacher = load_model(teacher_spec, load_config(teacher_spec, 384))
    spec = ModelSpec(config=LLAMA, seed=3, keep_every=2)
    config = load_config(spec, 384)
    assert config.num_hidden_layers == 3 and pruned_from(spec, 384) == [0, 2, 4]
    student = load_model(spec, config)
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert resolve_layer_map("pruned", 3, 6, pruned_from(spec, 384)) == [(0, 1), (1, 3), (2, 5)]
    explicit = ModelSpec(config=LLAMA, keep_layers=[0, 5])
    assert load_config(explicit, 384).num_hidden_layers == 2
    with pytest.raises(ValueError, match="needs a pruned student"):
        resolve_layer_map("pruned", 3, 6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `path`"),
        ({"path": "x", "config": LLAMA}, "exactly one of `path`"),
        ({"config": {"hidden_size": 8}}, "needs `model_type`"),
        ({"path": "x", "dtype": "float8"}, "Unknown dtype 'float8'"),
        ({"path": "x", "keep_every": 2, "keep_layers": [0]}, "not both"),
    ],
)
def test_bad_model_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**kwargs)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(ModelSpec(path=str(tmp_path / "nope")))


def test_vocabulary_checks():
    tok = tiny_tokenizer()
    small = load_config(ModelSpec(config={**LLAMA, "vocab_size": 100}))
    with pytest.raises(ValueError, match="smaller than the tokenizer's"):
        check_vocab(tok, small, "student")
    check_vocab(tok, load_config(ModelSpec(config={**LLAMA, "vocab_size": 512})), "student")  # padded is fine
    other = tiny_tokenizer(vocab_size=320)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(tok, other)
    check_same_tokenizer(tok, tiny_tokenizer())
