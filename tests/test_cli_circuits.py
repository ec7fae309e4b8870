"""`tinygpt patch`, `tinygpt lens` and `tinygpt experiment induction` on tiny inputs made here."""

import json
import re

import matplotlib.image
import pytest
import torch
from runs import save_untrained_run

from tinygpt.checkpoint import load_checkpoint
from tinygpt.circuits import direct_logit_attribution, patch
from tinygpt.cli import main
from tinygpt.experiments.induction import InductionSettings, jump_step, run_induction
from tinygpt.pictures import display_token

TEXT = 40 * "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me!\n\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits-cli")
    return save_untrained_run(root / "base", TEXT, 3, d_model=32, n_heads=4, n_layers=2,
                              max_seq=32, norm_first=True, attn_only=True)


def test_patch_draws_the_heatmap_of_the_librarys_numbers(run, tmp_path, capsys):
    png = tmp_path / "patch.png"
    assert main(["patch", "--checkpoint", str(run), "--clean", "ROMEO: But soft",
                 "--corrupted", "JULIE: But soft", "--target", "w", "--foil", "a",
                 "--out", str(png), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert matplotlib.image.imread(png)[..., :3].std() > 0.05
    ckpt = load_checkpoint(run)
    clean, corrupted = (torch.tensor([ckpt.tokenizer.encode(s)]) for s in
                        ("ROMEO: But soft", "JULIE: But soft"))
    w, a = ckpt.tokenizer.encode("wa")
    logits = ckpt.model(clean)[0, -1]
    assert f"clean {logits[w] - logits[a]:.3f}" in out
    heads = patch(ckpt.model, clean, corrupted, ["blocks.1.attention.hook_z"],
                  lambda out: out[0, -1, w] - out[0, -1, a])
    assert heads.shape == (1, 4)
    assert main(["patch", "--checkpoint", str(run), "--clean", "ROMEO", "--corrupted", "JUL",
                 "--out", str(png)]) == 2
    assert "needs equal lengths" in capsys.readouterr().err


def test_lens_prints_the_models_own_top_token_in_its_last_column(run, capsys):
    prompt = "ROMEO: But"
    assert main(["lens", "--checkpoint", str(run), "--prompt", prompt, "--target", "s",
                 "--foil", "w", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ckpt = load_checkpoint(run)
    idx = torch.tensor([ckpt.tokenizer.encode(prompt)])
    logits = ckpt.model(idx)[0]
    rows = re.findall(r"^\s+(\d+)\s+'(.+?)'\s+'(.+?)' (\d\.\d\d)\s+'(.+?)' (\d\.\d\d)$", out, re.M)
    assert len(rows) == len(prompt)
    for t, row in enumerate(rows):
        assert row[4] == display_token(ckpt.tokenizer.decode([int(logits[t].argmax())]))
    s, w = ckpt.tokenizer.encode("sw")
    total = direct_logit_attribution(ckpt.model, idx, s, w).logit_diff[0]
    assert f"(total {total:.3f})" in out and "L1H3" in out
    assert main(["lens", "--checkpoint", str(run), "--prompt", prompt, "--target", "so"]) == 2
    assert "must be exactly one token" in capsys.readouterr().err


def test_the_induction_experiment_is_repeatable_and_writes_its_files(tmp_path, capsys):
    settings = InductionSettings(steps=6, eval_every=3, batch_size=8, d_model=16, max_seq=24,
                                 eval_windows=4)
    first = run_induction(TEXT, tmp_path / "a", settings)
    second = run_induction(TEXT, tmp_path / "b", settings)
    assert first.metrics.read_bytes() == second.metrics.read_bytes()
    assert first.figure.read_bytes() == second.figure.read_bytes()  # the same picture, bytewise
    records = [json.loads(line) for line in first.metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert len(records[0]["induction"]) == 2
    assert len(records[0]["induction"][0]) == settings.n_heads
    assert "train_loss" in records[1] and "train_loss" not in records[0]
    assert load_checkpoint(first.checkpoint).step == 6
    assert main(["experiment", "induction", "--corpus", str(tmp_path / "none.txt")]) == 2
    assert "none.txt" in capsys.readouterr().err


def test_the_jump_is_where_the_score_passes_halfway():
    scores = [0.02, 0.03, 0.05, 0.30, 0.70, 0.80, 0.82]
    records = [{"step": 10 * i, "induction": [[0.0], [s]]} for i, s in enumerate(scores)]
    assert jump_step(records, (1, 0)) == 40  # halfway: 0.42
    flat = [{"step": i, "induction": [[0.0], [0.1]]} for i in range(3)]
    assert jump_step(flat, (1, 0)) is None
