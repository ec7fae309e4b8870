"""The decoder model: shapes, input validation, initialisation, the loss, dropout, the mask buffer."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from strategies import MODEL_EXAMPLES, SEED_CONFIG, model_cases, with_examples
from torch import nn

from reference import ReferenceDecoderModel
from tinygpt import ModelConfig, TinyDecoderModel, next_token_loss


@given(case=model_cases())
@with_examples(MODEL_EXAMPLES)
def test_forward_gives_finite_logits_of_shape_b_t_v(case):
    torch.manual_seed(case.seed)
    model = TinyDecoderModel(case.config).to(case.dtype)
    logits = model(case.tokens())
    assert logits.shape == (case.batch, case.t, case.config.vocab_size)
    assert logits.dtype == case.dtype
    assert torch.isfinite(logits).all()


BAD_INPUTS = {
    "id = vocab_size": (torch.tensor([[0, 40]]), r"token id 40 is outside the vocabulary 0\.\.39"),
    "negative id": (torch.tensor([[-1, 3]]), r"token id -1 is outside the vocabulary 0\.\.39"),
    "t > max_seq": (torch.zeros(1, 33, dtype=torch.long),
                    r"sequence length 33 is outside 1\.\.max_seq=32"),
    "t = 0": (torch.zeros(1, 0, dtype=torch.long), r"sequence length 0 is outside 1\.\.max_seq=32"),
    "float ids": (torch.zeros(1, 4), r"int64 or int32 tensor, got dtype torch\.float32"),
    "bool ids": (torch.zeros(1, 4, dtype=torch.bool), r"int64 or int32 tensor, got dtype torch\.bool"),
    "uint8 ids": (torch.zeros(1, 4, dtype=torch.uint8),
                  r"int64 or int32 tensor, got dtype torch\.uint8"),
    "1-D ids": (torch.zeros(4, dtype=torch.long), r"shape \(batch, time\), got \(4,\)"),
    "3-D ids": (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \(batch, time\), got \(1, 2, 3\)"),
}


@pytest.mark.parametrize("idx, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_one_sentence_naming_the_value(idx, message):
    model = TinyDecoderModel(SEED_CONFIG)
    with pytest.raises(ValueError, match=message) as error:
        model(idx)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_int32_ids_give_the_same_logits_as_int64():
    model = TinyDecoderModel(SEED_CONFIG)
    idx = torch.arange(8).view(1, 8)
    assert torch.equal(model(idx.to(torch.int32)), model(idx))


# ------------------------------------------------------------------------------ initialisation

INIT_CONFIGS = {
    "seed": SEED_CONFIG,
    "shakespeare-cpu": ModelConfig.preset("shakespeare-cpu"),
    "wide-heads": ModelConfig(vocab_size=50, d_model=96, n_heads=3, n_layers=1, d_ff=200, max_seq=40),
}


def initialised_matrices(model):
    """(name, weight) of every matrix the seed's init touches, including MHA's packed in_proj."""
    for name, param in model.named_parameters():
        if param.ndim == 2:
            yield name, param.detach()


def xavier_std(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    return math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize("build", (TinyDecoderModel, ReferenceDecoderModel), ids=("hand", "reference"))
@pytest.mark.parametrize("config", INIT_CONFIGS.values(), ids=INIT_CONFIGS.keys())
def test_every_matrix_is_xavier_normal(config, build):
    """Each initialised matrix has mean 0 and std √(2 / (fan_in + fan_out)) within 5 standard
    errors of the sample, and is normal, not uniform: some entries lie beyond the √3·std edge
    that a uniform of that spread never crosses (for a normal, 8% of them do)."""
    torch.manual_seed(0)
    model = build(config)
    names = []
    for name, weight in initialised_matrices(model):
        names.append(name)
        n, std = weight.numel(), xavier_std(weight)
        assert abs(weight.mean().item()) <= 5 * std / math.sqrt(n), name
        assert abs(weight.std().item() / std - 1) <= 5 / math.sqrt(2 * n), name
        beyond = (weight.abs() > math.sqrt(3) * std).float().mean().item()
        assert 0.04 < beyond < 0.13, f"{name}: {beyond:.3f} of entries beyond √3·std"
    assert "positional" in names and "embedding.weight" in names and "head.weight" in names
    assert sum("attention" in name for name in names) == 2 * config.n_layers


@pytest.mark.parametrize("build", (TinyDecoderModel, ReferenceDecoderModel), ids=("hand", "reference"))
def test_biases_start_at_zero_and_layernorms_at_one_and_zero(build):
    model = build(replace(SEED_CONFIG, norm_first=True))
    norms = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            norms += 1
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    assert norms == 2 * SEED_CONFIG.n_layers + 1
    for name, param in model.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert torch.equal(param, torch.zeros_like(param)), name


# --------------------------------------------------------------------------------------- loss


def test_next_token_loss_is_right_when_t_equals_vocab():
    """t == v is where an unflattened cross_entropy silently reads logits as (b v t)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 5, generator=generator)
    targets = torch.randint(5, (2, 5), generator=generator)
    log_probs = logits.log_softmax(-1)
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(next_token_loss(logits, targets), expected)
    assert not torch.allclose(F.cross_entropy(logits, targets), expected)


# ------------------------------------------------------------------------ dropout, mask buffer


def test_dropout_acts_only_in_training():
    config = replace(SEED_CONFIG, dropout=0.3)
    torch.manual_seed(0)
    model = TinyDecoderModel(config)
    idx = torch.randint(40, (2, 16))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    plain = TinyDecoderModel(replace(config, dropout=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model(idx), plain(idx))


def test_causal_mask_is_a_buffer_outside_the_state_dict():
    """Derived from max_seq, so checkpoints need not carry it, and it moves with .to()."""
    model = TinyDecoderModel(SEED_CONFIG)
    assert "causal_mask" in dict(model.named_buffers())
    assert "causal_mask" not in model.state_dict()
    assert model.double().causal_mask.dtype == torch.float64
