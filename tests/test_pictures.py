"""Heatmap grid, loss curve and the self-contained HTML explorer (the browser test is in
test_pictures_browser), and that no picture function touches matplotlib's global state."""

import errno
import importlib
import json
import os
import re

import matplotlib
import matplotlib.image
import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.pictures import (
    attention_html,
    attention_patterns,
    display_token,
    plot_attention_grid,
    plot_loss_curve,
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


def test_loss_curve_png_from_metrics_records(tmp_path):
    records = [{"step": s, "train_loss": 3.0 / s, "lr": 1e-3} for s in range(1, 21)]
    records[9]["val_loss"] = records[19]["val_loss"] = 0.5
    image = matplotlib.image.imread(plot_loss_curve(records, tmp_path / "loss.png"))
    assert image.shape[:2] == (350, 600)  # 6 x 3.5 inches at 100 dpi
    assert image[..., :3].std() > 0.05


def _bench_results():
    """The smallest results dict `benchmarks.report.plot_results` draws: one size, two
    implementations, a two-point context sweep."""
    attention = [{"name": "tiny", "pass": "forward+backward", "device": "cpu", "impl": impl,
                  "ratio_vs_mha": ratio, "ratio_q1": ratio - 0.1, "ratio_q3": ratio + 0.1}
                 for impl, ratio in (("mha", 1.0), ("hand", 0.9))]
    sweep = [{"device": "cpu", "dtype": "float32", "impl": "hand", "context": context,
              "median_s": 1e-3 * context, "peak_bytes": 2**20 * context} for context in (64, 128)]
    return {"implementations": {"mha": "nn.MultiheadAttention", "hand": "hand-written"},
            "attention": attention, "sweep": sweep, "quick": True,
            "machine": {"cpu": "test cpu", "threads": 1, "torch": torch.__version__}}


@pytest.fixture
def users_matplotlib():
    """A caller's matplotlib, as in a notebook: a backend of their choice (svg here, which is not
    the Agg a careless library would switch to) and a figure of their own open in pyplot."""
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    figure = plt.figure()
    yield plt, figure
    plt.close(figure)
    matplotlib.use(before)


def test_pictures_leave_matplotlib_global_state_alone(tmp_path, users_matplotlib):
    """Importing and calling every picture function keeps the caller's backend, pyplot's figure
    list and current figure: they draw on a `Figure` of their own and never go through pyplot."""
    plt, figure = users_matplotlib
    import benchmarks.report

    importlib.reload(benchmarks.report)  # its import-time effects count too
    patterns = torch.ones(1, 2, 4, 4).tril() / torch.arange(1, 5).view(4, 1)
    plot_attention_grid(patterns, list("abcd"), tmp_path / "grid.png", blocked=patterns == 0)
    plot_loss_curve([{"step": 1, "train_loss": 2.0, "val_loss": 2.1}], tmp_path / "loss.png")
    benchmarks.report.plot_results(_bench_results(), tmp_path / "bench.png")
    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == [figure.number] and plt.gcf() is figure
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("grid.png", "loss.png",
                                                                    "bench.png"))


def test_the_html_page_refuses_non_finite_weights_instead_of_writing_bad_json(tmp_path):
    """Bare NaN is not JSON: the page's data would not parse. Refused in one sentence, no file."""
    from tinygpt.pictures import save_attention_html

    patterns = torch.full((1, 1, 3, 3), 1 / 3)
    patterns[0, 0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^the attention weights hold NaN or infinite values"):
        save_attention_html(patterns, ["a", "b", "c"], tmp_path / "page.html")
    assert not (tmp_path / "page.html").exists()


def _window_model_prompt_and_patterns(window=3, t=9):
    """A window model's weights with one *allowed* cell set to exactly 0.0 per head: a weight the
    model could give by itself, which must still not be drawn as blocked."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_seq=16,
                         window=window, position="alibi")
    model = TinyDecoderModel(config).eval()
    idx = torch.randint(0, 40, (1, t), generator=torch.Generator().manual_seed(3))
    patterns = attention_patterns(model, idx)
    patterns[:, :, t - 1, t - 2] = 0.0  # allowed (inside the window), but weighs nothing
    offset = torch.arange(t).view(t, 1) - torch.arange(t).view(1, t)  # i j
    expected = ((offset < 0) | (offset >= window)).expand(2, 2, t, t)  # the window, by hand
    return model, idx, patterns, expected


def test_blocked_cells_are_the_mask_the_model_used_not_the_near_zero_weights(tmp_path):
    from tinygpt.pictures import blocked_cells, mask_note, shown_weights

    model, idx, patterns, expected = _window_model_prompt_and_patterns()
    blocked = blocked_cells(model, idx)
    assert torch.equal(blocked, expected)
    drawn = shown_weights(patterns, blocked)  # what the PNG draws: masked cells in hatched grey
    assert torch.equal(torch.from_numpy(drawn.mask), expected)
    note = mask_note(model)
    assert note.startswith("sliding window W = 3; ALiBi") and "0.0625" in note
    assert mask_note(TinyDecoderModel(ModelConfig.preset("seed"))) is None
    path = plot_attention_grid(patterns, list("abcdefghi"), tmp_path / "w.png", "w", blocked, note)
    assert matplotlib.image.imread(path)[..., :3].std() > 0.05


def test_html_marks_exactly_the_blocked_cells_with_a_tooltip(tmp_path):
    from tinygpt.pictures import blocked_cells, mask_note, save_attention_html

    model, idx, patterns, expected = _window_model_prompt_and_patterns()
    path = save_attention_html(patterns, list("abcdefghi"), tmp_path / "w.html",
                               blocked=blocked_cells(model, idx), note=mask_note(model))
    page = path.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="attention-data" type="application/json">(.*?)'
                                r"</script>", page, re.S).group(1))
    t = idx.shape[1]
    for layer in range(2):
        for head in range(2):
            for i in range(t):  # the page keeps the lower triangle, keys 0..i
                row = data["blocked"][layer][head][i]
                assert row == expected[layer, head, i, :i + 1].int().tolist()
    assert data["note"] == mask_note(model)
    assert "blocked by the mask" in page
    with pytest.raises(ValueError, match="blocked must be a bool tensor of the patterns' shape"):
        save_attention_html(patterns, list("abcdefghi"), tmp_path / "x.html",
                            blocked=expected[0].float())


def test_a_picture_that_fails_while_rendering_leaves_the_previous_one(tmp_path, monkeypatch):
    """Rendered in memory, then renamed into place: a renderer that dies after writing half a
    file must not have touched the picture already there."""
    from matplotlib.figure import Figure

    def dies_halfway(self, target, **options):
        out = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
        out.write(b"\x89PNG, half of it")
        raise RuntimeError("the renderer died")

    path = tmp_path / "loss.png"
    path.write_bytes(b"the previous curve")
    monkeypatch.setattr(Figure, "savefig", dies_halfway)
    with pytest.raises(RuntimeError, match="renderer died"):
        plot_loss_curve([{"step": 1, "train_loss": 2.0}], path)
    assert path.read_bytes() == b"the previous curve"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_a_page_whose_write_fails_leaves_the_previous_one(tmp_path, monkeypatch):
    import tinygpt.files
    from tinygpt.pictures import save_attention_html

    def fails(fd):
        raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "page.html"
    path.write_text("the previous page", encoding="utf-8")
    monkeypatch.setattr(tinygpt.files.os, "fsync", fails)
    patterns = torch.full((1, 1, 2, 2), 0.5)
    with pytest.raises(OSError, match="Input/output error"):
        save_attention_html(patterns, ["a", "b"], path)
    assert path.read_text(encoding="utf-8") == "the previous page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
