"""Heatmap grid and the self-contained HTML explorer (the browser test is in test_pictures_browser)."""

import json
import re

import matplotlib.image
import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.pictures import (
    attention_html,
    attention_patterns,
    display_token,
    plot_attention_grid,
)


def _model_and_prompt(t=10):
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset("seed")).eval()
    idx = torch.randint(0, 40, (1, t), generator=torch.Generator().manual_seed(3))
    return model, idx


def test_patterns_are_every_layer_and_head_of_the_prompt():
    model, idx = _model_and_prompt()
    patterns = attention_patterns(model, idx)
    assert patterns.shape == (2, 4, 10, 10)
    torch.testing.assert_close(patterns.sum(-1), torch.ones(2, 4, 10))
    with pytest.raises(ValueError, match=r"one prompt of shape \(1, t\), got \(2, 10\)"):
        attention_patterns(model, idx.repeat(2, 1))


def test_grid_png_has_one_heatmap_per_layer_and_head(tmp_path):
    model, idx = _model_and_prompt()
    patterns = attention_patterns(model, idx)
    path = plot_attention_grid(patterns, list("ROMEO: hi\n"), tmp_path / "attn.png")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(ValueError, match="got 3 tokens for 10 attention positions"):
        plot_attention_grid(patterns, list("abc"), tmp_path / "bad.png")


def test_whitespace_tokens_are_made_visible():
    assert display_token(" ") == "·"
    assert display_token("a\nb") == "a\\nb"
    assert display_token("") == "∅"


def test_html_is_self_contained_and_embeds_the_weights():
    model, idx = _model_and_prompt()
    patterns = attention_patterns(model, idx)
    page = attention_html(patterns, ["</script>", *"bcdefghij"])
    assert not re.search(r"https?://|<script[^>]*\bsrc=|<link\b|@import|url\(", page)
    assert page.count("</script>") == 2  # the token "</script>" was escaped
    payload = re.search(r'<script id="attention-data" type="application/json">(.*?)</script>',
                        page, re.S).group(1)
    data = json.loads(payload)
    assert data["tokens"][0] == "</script>"
    row = data["patterns"][1][2][6]
    assert len(row) == 7
    torch.testing.assert_close(torch.tensor(row), patterns[1, 2, 6, :7], atol=1e-6, rtol=0)


def test_long_prompts_get_sparser_labels_not_a_giant_figure(tmp_path):
    t = 200
    patterns = torch.ones(1, 1, t, t).tril() / torch.arange(1, t + 1).view(t, 1)
    short = plot_attention_grid(patterns[..., :64, :64], ["x"] * 64, tmp_path / "short.png")
    long = plot_attention_grid(patterns, ["x"] * t, tmp_path / "long.png")
    short_width = matplotlib.image.imread(short).shape[1]
    assert matplotlib.image.imread(long).shape[1] <= 1.2 * short_width
