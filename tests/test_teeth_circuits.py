"""Circuit behaviour the broader tests leave open: the probe's distinct tokens at the vocabulary's
edge, which K-composition scores the induction experiment reports, the metrics' conventions, and
composition scores of grouped key/value heads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.checkpoint import load_checkpoint
from tinygpt.circuits import composition_scores, in_context_learning_score, logit_difference
from tinygpt.experiments.induction import InductionSettings, run_induction
from tinygpt.induction import repeated_tokens

TEXT = "the cat sat on the mat and the dog sat on the log; " * 40


def test_a_copy_as_long_as_the_vocabulary_holds_every_token_once():
    """With exactly n tokens in the vocabulary, a copy of n tokens is a permutation of them: the
    copy one period back is then the only earlier occurrence of each token."""
    for vocab in (6, 9):
        idx = repeated_tokens(vocab, batch=8, t=2 * 6, generator=torch.Generator().manual_seed(1))
        assert torch.equal(idx[:, :6], idx[:, 6:])
        assert all(len(set(row[:6].tolist())) == 6 for row in idx), vocab


def _k_composition_by_hand(model, later_head: int) -> list[float]:
    """||W_QK^l W_OV^e||_F / (||W_QK^l||_F ||W_OV^e||_F) for every head e of layer 0 and head l of
    layer 1, from the fused weights sliced with plain indexing."""
    m, d = model.config.d_model, model.config.d_head

    def circuits(layer, head):
        w = model.blocks[layer].attention.in_proj.weight.detach().double()
        rows = slice(head * d, (head + 1) * d)
        w_q, w_k, w_v = w[:m][rows], w[m:2 * m][rows], w[2 * m:][rows]
        w_o = model.blocks[layer].attention.out_proj.weight.detach().double()[:, rows]
        return w_q.T @ w_k, w_o @ w_v

    def norm(x):
        return math.sqrt(float((x * x).sum()))

    qk, _ = circuits(1, later_head)
    return [norm(qk @ ov) / (norm(qk) * norm(ov))
            for ov in (circuits(0, e)[1] for e in range(model.config.n_heads))]


def test_the_experiment_reports_k_composition_of_each_earlier_head_into_its_induction_head(
        tmp_path):
    """The summary lists, for the induction head it found in layer 1, the K-composition score of
    every layer-0 head into it, and names the best of those as the previous-token head."""
    settings = InductionSettings(steps=2, eval_every=2, batch_size=4, d_model=24, n_heads=3,
                                 max_seq=12, eval_windows=4)
    result = run_induction(TEXT, tmp_path, settings)
    summary = json.loads((tmp_path / "summary.json").read_text())
    model = load_checkpoint(result.checkpoint).model
    expected = _k_composition_by_hand(model, result.induction_head[1])
    assert summary["k_composition"] == pytest.approx(expected, rel=1e-5)
    assert result.previous_head == (0, max(range(3), key=expected.__getitem__))
    assert result.k_composition == pytest.approx(max(expected), rel=1e-5)


def test_the_logit_difference_metric_is_the_batch_mean_at_the_position():
    """logit(target) - logit(foil) at `position`, averaged over the batch (so a patching result
    does not grow with the number of prompts), written out for a 3-row batch."""
    logits = torch.arange(3 * 4 * 5, dtype=torch.float64).reshape(3, 4, 5) ** 1.5
    for position in (-1, 1):
        by_hand = sum(float(logits[b, position, 2] - logits[b, position, 4]) for b in range(3)) / 3
        assert float(logit_difference(2, 4, position)(logits)) == pytest.approx(by_hand)


def test_the_in_context_score_is_negative_when_later_tokens_are_predicted_better():
    """Loss at the late position minus loss at the early one: a model that gains from its
    context has a lower late loss, and so a negative score (Olsson et al.'s sign)."""
    losses = torch.tensor([4.0, 3.5, 3.0, 2.0, 1.5])
    assert in_context_learning_score(losses, early=1, late=4) == pytest.approx(-2.0)


def test_composition_scores_of_grouped_heads_equal_those_of_the_same_heads_ungrouped():
    """A model whose 4 query heads share 2 key/value heads computes what a full multi-head model
    does when each query head gets its own copy of its group's key and value rows; its
    composition scores must be that model's (and not an error about the packed projection)."""
    torch.manual_seed(0)
    fields = dict(vocab_size=11, d_model=16, n_heads=4, n_layers=3, d_ff=16, max_seq=12,
                  norm_first=True)
    grouped = TinyDecoderModel(ModelConfig(**fields, n_kv_heads=2)).double().eval()
    full = TinyDecoderModel(ModelConfig(**fields)).double().eval()
    d = 4
    state = grouped.state_dict()
    for n in range(3):
        prefix = f"blocks.{n}.attention.in_proj."
        for kind in ("weight", "bias"):
            packed = state[prefix + kind]
            q, k, v = packed[:16], packed[16:24], packed[24:32]
            # query head h reads key/value head h // 2 (heads 0, 1 -> group 0; 2, 3 -> group 1)
            copies = [torch.cat([kv[(h // 2) * d:(h // 2 + 1) * d] for h in range(4)])
                      for kv in (k, v)]
            state[prefix + kind] = torch.cat([q, *copies])
    full.load_state_dict(state)
    idx = torch.randint(11, (2, 9))
    torch.testing.assert_close(grouped(idx), full(idx), rtol=1e-12, atol=1e-12)  # an exact copy
    got, expected = composition_scores(grouped), composition_scores(full)
    for kind in ("q", "k", "v"):
        torch.testing.assert_close(got[kind], expected[kind], rtol=1e-12, atol=1e-12)
