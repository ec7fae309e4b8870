"""The decoder model: shapes, input validation, initialisation, the loss, dropout, the mask
buffer, compiling whole, hook order, old checkpoint names, tied embeddings, attention-only
blocks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from strategies import MODEL_EXAMPLES, SEED_CONFIG, model_cases, with_examples
from torch import Tensor, nn

from reference import ReferenceDecoderModel
from tinygpt import ModelConfig, TinyDecoderModel, next_token_loss
from tinygpt.inspection import hook_names
from tinygpt.model import check_token_ids, parameter_table


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
    "t > max_seq": (
        torch.zeros(1, 33, dtype=torch.long),
        r"sequence length 33 is outside 1\.\.max_seq=32",
    ),
    "t = 0": (torch.zeros(1, 0, dtype=torch.long), r"sequence length 0 is outside 1\.\.max_seq=32"),
    "float ids": (torch.zeros(1, 4), r"int64 or int32 tensor, got dtype torch\.float32"),
    "bool ids": (
        torch.zeros(1, 4, dtype=torch.bool),
        r"int64 or int32 tensor, got dtype torch\.bool",
    ),
    "uint8 ids": (
        torch.zeros(1, 4, dtype=torch.uint8),
        r"int64 or int32 tensor, got dtype torch\.uint8",
    ),
    "1-D ids": (torch.zeros(4, dtype=torch.long), r"shape \(batch, time\), got \(4,\)"),
    "3-D ids": (torch.zeros(1, 2, 3, dtype=torch.long), r"shape \(batch, time\), got \(1, 2, 3\)"),
}


@pytest.mark.parametrize("idx, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_one_sentence_naming_the_value(idx, message):
    # The check lives at the boundaries (generation, the command line), not in forward, which must
    # compile whole and make no host sync.
    with pytest.raises(ValueError, match=message) as error:
        check_token_ids(idx, SEED_CONFIG)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


def test_int32_ids_give_the_same_logits_as_int64():
    model = TinyDecoderModel(SEED_CONFIG)
    idx = torch.arange(8).view(1, 8)
    assert torch.equal(model(idx.to(torch.int32)), model(idx))


# ------------------------------------------------------------------------------ initialisation

INIT_CONFIGS = {
    "seed": SEED_CONFIG,
    "shakespeare-cpu": ModelConfig.preset("shakespeare-cpu"),
    "wide-heads": ModelConfig(
        vocab_size=50, d_model=96, n_heads=3, n_layers=1, d_ff=200, max_seq=40
    ),
}


def initialised_matrices(model):
    """(name, weight) of every matrix the seed's init touches, including MHA's packed in_proj."""
    for name, param in model.named_parameters():
        if param.ndim == 2:
            yield name, param.detach()


def xavier_std(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    return math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize(
    "build", (TinyDecoderModel, ReferenceDecoderModel), ids=("hand", "reference")
)
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
    assert "positional" in names and "embedding.weight" in names and "lm_head.weight" in names
    assert sum("attention" in name for name in names) == 2 * config.n_layers


@pytest.mark.parametrize(
    "build", (TinyDecoderModel, ReferenceDecoderModel), ids=("hand", "reference")
)
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


# ------------------------------------------------------------------ compiling, hooks, old names


def test_forward_and_loss_compile_whole():
    """`fullgraph=True` turns any graph break (a host sync, a data-dependent branch, a Python-side
    value check) into an error, so the training step compiles as one graph. The counting backend
    proves the compiled graph really ran rather than a silent eager fallback."""
    calls = []

    def counting_backend(graph_module, example_inputs):
        calls.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset("shakespeare-cpu", vocab_size=40, n_layers=2))
    step = torch.compile(
        lambda x, y: next_token_loss(model(x), y), backend=counting_backend, fullgraph=True
    )
    x, y = torch.randint(40, (2, 16)), torch.randint(40, (2, 16))
    torch.testing.assert_close(step(x, y), next_token_loss(model(x), y))
    assert len(calls) == 1


def test_hook_names_follow_the_order_hooks_fire():
    """The declared order that `hook_names` reads equals the order of a real forward pass."""
    for config in (SEED_CONFIG, ModelConfig.preset("shakespeare-cpu", vocab_size=40, n_layers=2)):
        model = TinyDecoderModel(config)
        fired = []
        handles = [
            module.register_forward_hook(lambda m, i, o, name=name: fired.append(name))
            for name, module in model.named_modules()
            if name in set(hook_names(model))
        ]
        model(torch.randint(40, (1, 8)))
        for handle in handles:
            handle.remove()
        assert fired == hook_names(model)
        assert len(fired) == 12 * config.n_layers


def test_old_state_dict_names_still_load():
    """Checkpoints saved when the LM head was `head` and the MLP an `nn.Sequential` (`mlp.0`,
    `mlp.2`) load into today's names with strict=True, to the same logits."""
    torch.manual_seed(0)
    model = TinyDecoderModel(SEED_CONFIG)
    old = {}
    for key, value in model.state_dict().items():
        key = key.replace("lm_head.", "head.").replace("mlp.fc_in.", "mlp.0.")
        old[key.replace("mlp.fc_out.", "mlp.2.")] = value.clone()
    assert "head.weight" in old and "blocks.0.mlp.2.bias" in old
    fresh = TinyDecoderModel(SEED_CONFIG)
    fresh.load_state_dict(old, strict=True)
    idx = torch.randint(40, (2, 8))
    assert torch.equal(fresh(idx), model(idx))


def test_tied_embeddings_share_one_tensor_counted_once():
    config = replace(SEED_CONFIG, tie_embeddings=True, head_bias=False)
    torch.manual_seed(0)
    model = TinyDecoderModel(config)
    assert model.lm_head.weight is model.embedding.weight
    total = sum(p.numel() for p in model.parameters())
    assert total == 20_712 - 40 * 32 - 40 == sum(n for _, n in parameter_table(model))
    assert "lm_head.weight" not in model.state_dict()  # safetensors refuses a shared storage
    before = model.embedding.weight.detach().clone()
    next_token_loss(model(torch.randint(40, (2, 8))), torch.randint(40, (2, 8))).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.embedding.weight, before)
    assert model.lm_head.weight is model.embedding.weight
    reloaded = TinyDecoderModel(config)
    reloaded.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(reloaded.lm_head.weight, model.embedding.weight)


def test_attention_only_blocks_have_no_mlp():
    config = replace(SEED_CONFIG, attn_only=True, norm_first=True)
    model = TinyDecoderModel(config)
    assert all(block.mlp is None for block in model.blocks)
    assert not any("mlp" in name or "norm2" in name for name, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(n for _, n in parameter_table(model))


def test_gpt2_preset_has_gpt2_smalls_published_parameter_count():
    """124,439,808 is the count `transformers` reports for GPT-2 small (tied head, no head bias).
    Built on the meta device: sizes without memory."""
    with torch.device("meta"):
        model = TinyDecoderModel(ModelConfig.preset("gpt2"))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert sum(n for _, n in parameter_table(model)) == 124_439_808


# ------------------------------------------------------------------ dropout at every site, alone

def _dropped(site: str, observed: Tensor, undropped: Tensor, scale: float) -> float:
    """The fraction of `undropped` that dropout zeroed in `observed`, after checking that every
    other entry was multiplied by `scale` (1 / (1 - p) in training, 1 in eval)."""
    kept = observed != 0
    torch.testing.assert_close(observed[kept], scale * undropped[kept], rtol=1e-5, atol=1e-6,
                               msg=lambda text: f"{site}: {text}")
    live = undropped != 0
    return float((~kept & live).sum() / live.sum())


def _capture(model, idx, names):
    seen = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda module, args, out, name=name: seen.__setitem__(name, out)) for name in names]
    try:
        model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("training", [True, False])
def test_dropout_fires_at_each_of_its_four_sites_in_training(training):
    """Each site checked on its own, against the value it drops computed here from the captured
    inputs: the embeddings, the attention weights, the attention output and the MLP output. In
    training about half of each is zeroed and the rest doubled (p = 0.5); in eval none is. A
    model missing dropout at any one site fails that site's check."""
    config = replace(SEED_CONFIG, dropout=0.5, norm_first=False, n_layers=1)
    torch.manual_seed(0)
    model = TinyDecoderModel(config).train(training)
    t = config.max_seq
    idx = torch.randint(config.vocab_size, (8, t))
    block = "blocks.0"
    seen = _capture(model, idx, [f"{block}.hook_resid_pre", f"{block}.attention.hook_q",
                                 f"{block}.attention.hook_k", f"{block}.attention.hook_pattern",
                                 f"{block}.attention.hook_z", f"{block}.hook_attn_out",
                                 f"{block}.hook_resid_mid", f"{block}.hook_mlp_out"])
    attention, mlp = model.blocks[0].attention, model.blocks[0].mlp
    with torch.no_grad():
        embedded = model.embedding.weight[idx] + model.positional[:t]
        q, k = seen[f"{block}.attention.hook_q"], seen[f"{block}.attention.hook_k"]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        z = seen[f"{block}.attention.hook_z"]  # b h i d
        heads_joined = z.transpose(1, 2).reshape(z.shape[0], t, -1)
        attn_out = heads_joined @ attention.out_proj.weight.T + attention.out_proj.bias
        mlp_out = mlp(seen[f"{block}.hook_resid_mid"])
    scale = 2.0 if training else 1.0
    observed = {"embedding": (f"{block}.hook_resid_pre", embedded),
                "attention weights": (f"{block}.attention.hook_pattern", weights),
                "attention output": (f"{block}.hook_attn_out", attn_out),
                "mlp output": (f"{block}.hook_mlp_out", mlp_out)}
    fractions = {site: _dropped(site, seen[hook], undropped, scale)
                 for site, (hook, undropped) in observed.items()}
    for site, fraction in fractions.items():
        assert (0.4 < fraction < 0.6) if training else fraction == 0.0, (site, fractions)
