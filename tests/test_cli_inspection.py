"""`tinygpt heads`, `tinygpt inspect` and `tinygpt finetune` on a tiny checkpoint made here."""

import hashlib
import re

import matplotlib.image
import pytest
import torch
from runs import save_untrained_run

from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main
from tinygpt.inspection import classify_heads, eval_windows, head_importance
from tinygpt.tokenizer import CharTokenizer

TEXT = 30 * "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me!\n\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspection-cli")
    # The seed preset's sizes and input scale, pre-norm.
    save_untrained_run(root / "runs" / "base", TEXT, 7, norm_first=True, seed_input_scale=True)
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return root / "runs" / "base", corpus


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path, monkeypatch):
    """`heads` caches the corpus's tokens under --data-dir (default data/cache, relative): here."""
    monkeypatch.chdir(tmp_path)


def _digests(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_heads_prints_every_heads_ablation_loss_rise_and_kind(run, capsys):
    run_dir, corpus = run
    assert main(["heads", "--checkpoint", str(run_dir), "--corpus", str(corpus),
                 "--device", "cpu", "--windows", "4", "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d)\s+(\d)\s+([+-]\d\.\d{4})\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$",
                      out, re.M)
    assert len(rows) == 8
    # The numbers are the library's on the same windows.
    ckpt = load_checkpoint(run_dir)
    ids = ckpt.tokenizer.encode(TEXT)
    idx, targets = eval_windows(ids[len(ids) - int(len(ids) * 0.5):], 32, 4)
    base, rise = head_importance(ckpt.model, idx, targets)
    scores = classify_heads(ckpt.model, idx)
    assert f"validation loss {base:.4f} on 4 windows of 32 tokens (step 7)" in out
    for (layer, head, shown, prev, _first, _itself, induct, kind), s in zip(rows, scores):
        assert float(shown) == pytest.approx(rise[int(layer), int(head)].item(), abs=1e-4)
        assert float(prev) == pytest.approx(s.previous_token, abs=1e-3)
        assert float(induct) == pytest.approx(s.induction, abs=1e-3)
        assert kind == s.kind
    assert "most important: layer" in out


def test_inspect_writes_the_png_grid_and_the_html_page(run, tmp_path, capsys):
    run_dir, _ = run
    png, page = tmp_path / "attn.png", tmp_path / "attn.html"
    assert main(["inspect", "--checkpoint", str(run_dir), "--prompt", "ROMEO: But soft",
                 "--out", str(png), "--html", str(page), "--device", "cpu"]) == 0
    assert matplotlib.image.imread(png)[..., :3].std() > 0.05
    html = page.read_text(encoding="utf-8")
    assert '"tokens": ["R", "O", "M", "E", "O", ":", "·", "B"' in html
    assert "wrote" in capsys.readouterr().out


def test_inspect_and_heads_report_bad_input_in_one_line(run, tmp_path, capsys):
    run_dir, corpus = run
    assert main(["inspect", "--checkpoint", str(run_dir), "--prompt", "hi"]) == 2
    assert "give --out FILE.png, --html FILE.html or both" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi",
                 "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinygpt: error: ") and "does not exist" in err
    assert len(err.splitlines()) == 1
    assert main(["heads", "--checkpoint", str(run_dir),
                 "--corpus", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_finetune_saves_adapters_beside_the_base_and_leaves_it_untouched(run, tmp_path, capsys):
    run_dir, corpus = run
    before = _digests(run_dir)
    assert main(["finetune", "--checkpoint", str(run_dir), "--corpus", str(corpus),
                 "--lora-rank", "2", "--lora-targets", "in_proj", "lm_head", "--steps", "3",
                 "--batch-size", "4", "--lr", "0.01", "--device", "cpu"]) == 0
    assert "wrote adapters to" in capsys.readouterr().out
    adapters = run_dir / "lora"
    assert (adapters / "adapter_model.safetensors").is_file()
    after = _digests(run_dir)
    assert {k: v for k, v in after.items() if k.parts[0] != "lora"} == before

    from tinygpt.lora import load_lora, merge_lora

    base = load_checkpoint(run_dir).model
    adapted = load_lora(base, adapters)
    idx = torch.tensor([CharTokenizer.from_text(TEXT).encode("ROMEO: But soft")])
    with torch.no_grad():
        assert not torch.allclose(adapted(idx), base(idx), atol=1e-4)
        torch.testing.assert_close(merge_lora(adapted)(idx), adapted(idx), rtol=1e-5, atol=1e-5)
    # The adapters are usable from the command line too: heads on the merged model.
    assert main(["heads", "--checkpoint", str(run_dir), "--corpus", str(corpus), "--windows", "2",
                 "--lora", str(adapters)]) == 0
    with_lora = capsys.readouterr().out
    assert main(["heads", "--checkpoint", str(run_dir), "--corpus", str(corpus),
                 "--windows", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] != with_lora.splitlines()[0]


def test_finetune_rejects_an_unknown_target(run, capsys):
    run_dir, corpus = run
    assert main(["finetune", "--checkpoint", str(run_dir), "--corpus", str(corpus),
                 "--lora-targets", "qkv"]) == 2
    assert "unknown LoRA target 'qkv'" in capsys.readouterr().err


def test_heads_says_when_every_token_is_unknown_and_when_a_damaged_cache_was_rebuilt(run, tmp_path,
                                                                                      capsys):
    run_dir, corpus = run
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("ÿ" * 400, encoding="utf-8")  # no character of it is in the vocabulary
    argv = ["heads", "--checkpoint", str(run_dir), "--corpus", str(foreign), "--device", "cpu",
            "--windows", "2", "--val-fraction", "0.5", "--data-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err == ("tinygpt: note: every token of the validation windows is <unk>: none of its "
                   "characters is in the checkpoint's vocabulary, so the results say nothing "
                   "about this text.\n")
    [tokens] = (tmp_path / "cache" / "tokens").glob("foreign-*/tokens.bin")
    with open(tokens, "r+b") as f:
        f.write(bytes(16))  # eight <unk> ids become id 0
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"tinygpt: note: token cache '.*' is damaged: tokens\.bin no longer has "
                        r"the sha256 it was written with; it was rebuilt\.", err[0]), err
    assert err[1].startswith("tinygpt: note: every token of the validation windows is <unk>")


def test_inspect_says_when_the_prompt_is_longer_than_max_seq(run, tmp_path, capsys):
    run_dir, _ = run
    prompt = "ROMEO: But soft, what light through yonder window breaks? JULIET: Ay me!"
    page = tmp_path / "long.html"
    assert main(["inspect", "--checkpoint", str(run_dir), "--prompt", prompt, "--html", str(page),
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ("tinygpt: note: the prompt has more tokens than max_seq = "
                                       "32; only its last 32 are drawn.\n")
    html = page.read_text(encoding="utf-8")
    assert f"last tokens of the prompt: &#x27;{prompt[-32:]}&#x27;</title>" in html


def test_finetune_reads_windows_from_the_memory_mapped_cache_and_says_when_all_is_unknown(
        run, tmp_path, capsys):
    run_dir, _ = run
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("ÿ" * 400, encoding="utf-8")
    assert main(["finetune", "--checkpoint", str(run_dir), "--corpus", str(foreign), "--steps",
                 "2", "--batch-size", "2", "--out", str(tmp_path / "lora"), "--data-dir",
                 str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().err.startswith("tinygpt: note: every token of the corpus is <unk>")
    assert list((tmp_path / "cache" / "tokens").glob("foreign-*/tokens.bin"))


def test_inspect_marks_what_a_window_models_mask_blocks(tmp_path, capsys):
    """A window of 3 with ALiBi: the page's blocked cells are the keys 3 or more behind their
    query, and the subtitle names the window and the slopes."""
    import json

    run_dir = tmp_path / "runs" / "window"
    save_untrained_run(run_dir, TEXT, 7, norm_first=True, window=3, position="alibi")
    page = tmp_path / "w.html"
    assert main(["inspect", "--checkpoint", str(run_dir), "--prompt", "ROMEO: But",
                 "--html", str(page), "--device", "cpu"]) == 0
    html = page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script id="attention-data" type="application/json">(.*?)'
                                r"</script>", html, re.S).group(1))
    rows = data["blocked"][0][0]
    assert rows == [[int(i - j >= 3) for j in range(i + 1)] for i in range(10)]
    assert data["note"].startswith("sliding window W = 3; ALiBi bias")
    capsys.readouterr()
