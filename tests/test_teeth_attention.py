"""Grouped key/value heads: what the cache holds, which is the reason to group them."""

from __future__ import annotations

import torch

from tinygpt import ModelConfig, TinyDecoderModel


def test_a_grouped_model_caches_only_its_key_value_heads_and_decodes_as_a_full_pass():
    """With 4 query heads sharing 2 key/value heads, each layer's cache holds `(b 2 j d)`: half
    the memory of one key and value per query head. Decoding through it gives the full pass's
    logits (fp64, 1e-10)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=11, d_model=16, n_heads=4, n_kv_heads=2, n_layers=2,
                         d_ff=24, max_seq=12, norm_first=True, position="rope")
    model = TinyDecoderModel(config).double().eval()
    idx = torch.randint(11, (3, 9))
    cache = model.new_cache()
    stepped = [model(idx[:, :6], cache=cache)]
    for t in range(6, 9):
        stepped.append(model(idx[:, t:t + 1], cache=cache))
    for layer in cache:
        assert layer.k.shape == layer.v.shape == (3, 2, 9, 4)
    torch.testing.assert_close(torch.cat(stepped, dim=1), model(idx), rtol=1e-10, atol=1e-10)
