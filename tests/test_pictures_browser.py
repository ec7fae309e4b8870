"""Drive the HTML attention explorer in a real headless Chromium (Debian's, never a download).

Outside CI the test skips when /usr/bin/chromium is missing; in CI (CI set) it fails instead, so
the check can never silently disappear. `make test` installs chromium with apt-get when missing.
"""

import io
import os
from pathlib import Path

import matplotlib.image
import pytest
import torch

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.pictures import attention_patterns, save_attention_html

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.browser


def missing_chromium_outcome(environ) -> str:
    """What to do without chromium: fail in CI (CI set, as CI systems do), skip on a laptop."""
    return "fail" if environ.get("CI") else "skip"


def test_missing_chromium_fails_in_ci_and_skips_elsewhere():
    assert missing_chromium_outcome({"CI": "true"}) == "fail"
    assert missing_chromium_outcome({"CI": "1"}) == "fail"
    assert missing_chromium_outcome({}) == "skip"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing; run `make chromium` (apt-get install -y chromium)."
        if missing_chromium_outcome(os.environ) == "fail":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _weights(page, panel):
    cells = page.locator(f"#panel-{panel} .tok")
    texts = [cells.nth(j).locator(".w").inner_text() for j in range(cells.count())]
    return [float(text) for text in texts if text and text != "×"]


def test_explorer_shows_the_models_weights_for_a_hovered_token(browser, tmp_path):
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset("seed", norm_first=True)).eval()
    # Sharpen the attention so different heads give clearly different rows.
    with torch.no_grad():
        for block in model.blocks:
            block.attention.in_proj.weight.mul_(4.0)
    idx = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(5))
    patterns = attention_patterns(model, idx)
    tokens = list("ROMEO: O she")
    path = save_attention_html(patterns, tokens, tmp_path / "attn.html")

    page = browser.new_page(viewport={"width": 1200, "height": 800})
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())

    page.select_option("#layer-a", "1")
    page.select_option("#head-a", "2")
    page.select_option("#layer-b", "0")
    page.select_option("#head-b", "3")
    query = 7
    page.hover(f"#panel-a .tok[data-i='{query}']")

    shown_a, shown_b = _weights(page, "a"), _weights(page, "b")
    assert len(shown_a) == len(shown_b) == query + 1
    torch.testing.assert_close(torch.tensor(shown_a), patterns[1, 2, query, :query + 1],
                               atol=5e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(shown_b), patterns[0, 3, query, :query + 1],
                               atol=5e-4, rtol=0)
    assert not torch.allclose(torch.tensor(shown_a), torch.tensor(shown_b), atol=1e-3)
    assert page.locator("#panel-b .tok.query").get_attribute("data-i") == str(query)
    assert page.locator("#panel-a .tok[data-i='3'] .t").inner_text() == "E"

    # Hovering another token moves the query in both panels.
    page.hover("#panel-b .tok[data-i='2']")
    assert len(_weights(page, "a")) == 3

    image = matplotlib.image.imread(io.BytesIO(page.screenshot(full_page=True)), format="png")
    assert image[..., :3].std() > 0.05
    assert len({tuple(p) for p in image[::7, ::7, :3].reshape(-1, 3).tolist()}) > 20
    assert errors == []
    assert requests == [path.as_uri()]  # nothing fetched beyond the file itself
    page.close()


def test_explorer_marks_the_cells_a_sliding_window_blocks(browser, tmp_path):
    """A window of 3: hovering query 7 shows keys 0..4 as blocked (class and tooltip), 5..7 with
    their weights (key 6's set to exactly 0.0, which is allowed, not blocked), no script error."""
    from tinygpt.pictures import blocked_cells, mask_note

    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset("seed", window=3)).eval()
    idx = torch.randint(0, 40, (1, 10), generator=torch.Generator().manual_seed(5))
    patterns = attention_patterns(model, idx)
    patterns[:, :, 7, 6] = 0.0
    path = save_attention_html(patterns, list("ROMEO: O s"),
                               tmp_path / "w.html", blocked=blocked_cells(model, idx),
                               note=mask_note(model))
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.as_uri())
    page.hover("#panel-a .tok[data-i='7']")
    cells = page.locator("#panel-a .tok")
    blocked = [j for j in range(10) if "blocked" in cells.nth(j).get_attribute("class").split()]
    assert blocked == [0, 1, 2, 3, 4]
    assert {cells.nth(j).get_attribute("title") for j in blocked} == {"blocked by the mask"}
    assert len(_weights(page, "a")) == 3 and _weights(page, "a")[1] == 0.0  # the window's keys
    assert page.locator("#note").inner_text() == "sliding window W = 3"
    assert errors == []
