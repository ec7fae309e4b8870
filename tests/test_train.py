"""The trainer: schedule, optimizer groups, learning, bit-identical resume, crash safety, Ctrl-C,
non-finite loss and data-parallel equivalence. All on tiny models, CPU only."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from corpora import synthetic_text

from tinygpt.checkpoint import checkpoint_dirs, load_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.data import TokenData
from tinygpt.tokenizer import CharTokenizer
from tinygpt.train import NonFiniteLossError, TrainConfig, lr_at, make_optimizer, train

TEXT, _ = synthetic_text("uniform", 4000, n_symbols=6, seed=1)
TOKENIZER = CharTokenizer.from_text(TEXT)
DATA = TokenData.from_tokens(TOKENIZER.encode(TEXT))
MODEL = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                    max_seq=8, dropout=0.1, norm_first=True, activation="gelu")
TRAIN = TrainConfig(steps=200, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                    eval_every=50, eval_batches=2, save_every=1000)
REPO = Path(__file__).resolve().parents[1]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_lr_warmup_then_cosine():
    config = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55)
    assert lr_at(110, config) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    from tinygpt.model import TinyDecoderModel

    model = TinyDecoderModel(MODEL)
    decayed, plain = make_optimizer(model, TRAIN).param_groups
    assert decayed["weight_decay"] == TRAIN.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_gpt2_init_scales_residual_projections():
    from tinygpt.model import TinyDecoderModel
    from tinygpt.train import gpt2_init

    torch.manual_seed(0)
    model = TinyDecoderModel(replace(MODEL, d_model=64, d_ff=256, n_layers=2))
    gpt2_init(model)
    params = dict(model.named_parameters())
    assert params["blocks.0.attention.in_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    shrunk = pytest.approx(0.01, rel=0.05)  # 0.02 / sqrt(2 n_layers)
    assert params["blocks.1.mlp.fc_out.weight"].std().item() == shrunk
    assert params["blocks.1.attention.out_proj.weight"].std().item() == shrunk
    assert all(not p.any() for n, p in params.items() if n.endswith("bias"))
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in params.items()
               if "norm" in n and n.endswith("weight"))


def test_learns_a_corpus_with_known_best_loss(tmp_path):
    """A cycle of 6 symbols is fully predictable: the loss must fall far below uniform ln 7."""
    text, best = synthetic_text("cycle", 2000, n_symbols=6)
    tokenizer = CharTokenizer.from_text(text)
    result = train(tmp_path, TokenData.from_tokens(tokenizer.encode(text)), tokenizer,
                   replace(MODEL, dropout=0.0), replace(TRAIN, steps=150, eval_every=150))
    assert result.val_loss < best + 0.05 < math.log(tokenizer.vocab_size)
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_resume_is_bit_identical(tmp_path):
    """200 steps straight == 100 steps, then resume for 100 more (dropout on, so RNG state
    counts)."""
    straight = train(tmp_path / "a", DATA, TOKENIZER, MODEL, TRAIN)
    first = train(tmp_path / "b", DATA, TOKENIZER, MODEL, TRAIN, until=100)
    assert first.step == 100
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["ckpt-00000100"]
    resumed = train(tmp_path / "b", DATA, TOKENIZER, MODEL, TRAIN, resume=True)
    assert straight.step == resumed.step == 200
    a, b = load_checkpoint(tmp_path / "a").model, load_checkpoint(tmp_path / "b").model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert straight.val_loss == resumed.val_loss
    assert [r["train_loss"] for r in _metrics(tmp_path / "a")] == \
        [r["train_loss"] for r in _metrics(tmp_path / "b")]


def test_resume_relogs_the_steps_after_its_checkpoint(tmp_path):
    """Steps logged after the last checkpoint by a run that then died (the last line cut short)
    are replaced on resume, not duplicated: the metrics equal those of a run never stopped."""
    straight = train(tmp_path / "a", DATA, TOKENIZER, MODEL, TRAIN, until=8)
    train(tmp_path / "b", DATA, TOKENIZER, MODEL, TRAIN, until=5)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train_loss": 9.0}\n{"step": 7, "train_loss": 9.0}\n{"step": 8, "tr')
    resumed = train(tmp_path / "b", DATA, TOKENIZER, MODEL, TRAIN, resume=True, until=8)
    assert straight.step == resumed.step == 8
    assert [(r["step"], r["train_loss"]) for r in _metrics(tmp_path / "b")] == \
        [(r["step"], r["train_loss"]) for r in _metrics(tmp_path / "a")]


def test_resume_refuses_other_config_or_tokenizer(tmp_path):
    train(tmp_path, DATA, TOKENIZER, MODEL, TRAIN, until=2)
    with pytest.raises(ValueError, match="checkpoint has d_ff=32 but this run asks for d_ff=64"):
        train(tmp_path, DATA, TOKENIZER, replace(MODEL, d_ff=64), TRAIN, resume=True)
    other = CharTokenizer(TOKENIZER.chars[::-1])
    with pytest.raises(ValueError, match="another tokenizer"):
        train(tmp_path, DATA, other, MODEL, TRAIN, resume=True)
    with pytest.raises(ValueError, match="already has checkpoints; pass --resume"):
        train(tmp_path, DATA, TOKENIZER, MODEL, TRAIN)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train(tmp_path, DATA, TOKENIZER, MODEL, TRAIN, until=3)
    good = load_checkpoint(tmp_path).model.state_dict()
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf).*ckpt-00000003"):
        train(tmp_path, DATA, TOKENIZER, MODEL, replace(TRAIN, lr=1e30, min_lr=0, warmup_steps=0),
              resume=True)
    kept = load_checkpoint(tmp_path)
    assert kept.step == 3
    assert all(torch.equal(good[k], v) for k, v in kept.model.state_dict().items())


def test_grad_accum_matches_full_batch(tmp_path):
    """Two micro-batches of 4 accumulate to the same step as one batch of 8."""
    model, config = replace(MODEL, dropout=0.0), replace(TRAIN, steps=5, batch_size=8)
    train(tmp_path / "full", DATA, TOKENIZER, model, config)
    train(tmp_path / "accum", DATA, TOKENIZER, model, replace(config, grad_accum=2))
    torch.testing.assert_close([r["train_loss"] for r in _metrics(tmp_path / "accum")],
                               [r["train_loss"] for r in _metrics(tmp_path / "full")],
                               rtol=0, atol=1e-5)


# --- real processes: Ctrl-C, SIGKILL, torchrun ----------------------------------------------

def _cli(tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return [sys.executable, "-m", "tinygpt", "train", "--corpus", str(corpus),
            "--data-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
            "--name", "r", "--config", "seed", "--d-model", "16", "--n-heads", "2",
            "--n-layers", "1", "--d-ff", "32", "--max-seq", "8", "--seed-input-scale", "false",
            "--batch-size", "4", "--eval-every", "1000", "--eval-batches", "1", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _wait_for(predicate, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_random_instants_leaves_a_loadable_checkpoint(tmp_path):
    rng = random.Random(0)
    run = tmp_path / "runs" / "r"
    steps_seen = []
    for attempt in range(3):
        resume = ["--resume"] if attempt else []
        command = _cli(tmp_path, "--steps", "100000", "--save-every", "1", *resume)
        process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        start = steps_seen[-1] if steps_seen else 0
        _wait_for(lambda: checkpoint_dirs(run) and load_checkpoint(run).step > start, process)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
        ckpt = load_checkpoint(run)  # verifies every file against the manifest
        assert ckpt.step > start
        steps_seen.append(ckpt.step)
    done = subprocess.run(_cli(tmp_path, "--steps", str(steps_seen[-1] + 2), "--resume"),
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run).step == steps_seen[-1] + 2
    assert [r["step"] for r in _metrics(run)] == list(range(1, steps_seen[-1] + 3))


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "runs" / "r"
    process = subprocess.Popen(_cli(tmp_path, "--steps", "100000", "--save-every", "100000"),
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _wait_for(lambda: (run / "metrics.jsonl").exists(), process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "tinygpt: interrupted" in err
    step = load_checkpoint(run).step
    assert step >= 1 and f"step {step}" in out
    assert _metrics(run)[-1]["step"] == step


@pytest.mark.slow
def test_torchrun_two_processes_follow_one_process_curve(tmp_path):
    """2 processes x batch 2 == 1 process x batch 4, step by step (DDP averages the gradients)."""
    common = ["--steps", "6", "--dropout", "0", "--eval-every", "3", "--eval-batches", "2"]
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                          *_cli(tmp_path, *common)[1:]], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    (tmp_path / "runs" / "r").rename(tmp_path / "ddp")
    single = subprocess.run(_cli(tmp_path, *common), env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr
    two, one = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "runs" / "r")
    assert len(two) == len(one) == 6  # rank 0 alone wrote
    for key in ("train_loss", "val_loss"):
        torch.testing.assert_close([r.get(key, 0.0) for r in two], [r.get(key, 0.0) for r in one],
                                   rtol=0, atol=1e-5)
    a, b = load_checkpoint(tmp_path / "ddp").model, load_checkpoint(tmp_path / "runs" / "r").model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5, msg=name)


# --- what the loop really does: learning rate, clipping, evaluation --------------------------

def _spy_optimizer(monkeypatch, record):
    """Make the trainer's optimizer call `record(optimizer)` just before each of its steps."""
    import tinygpt.train as module

    real = module.make_optimizer

    def spying(model, config):
        optimizer = real(model, config)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: record(opt))
        return optimizer

    monkeypatch.setattr(module, "make_optimizer", spying)


def test_each_step_uses_and_logs_its_own_learning_rate(tmp_path, monkeypatch):
    """Step k (0-based) updates with lr_at(k), and its metrics line says so: through warmup and
    decay the rate changes every step, so a loop one step ahead or behind is caught."""
    used = []
    _spy_optimizer(monkeypatch, lambda opt: used.append([g["lr"] for g in opt.param_groups]))
    config = replace(TRAIN, steps=12, warmup_steps=5)
    train(tmp_path, DATA, TOKENIZER, MODEL, config)
    expected = [lr_at(k, config) for k in range(12)]
    assert len(set(expected)) == 11  # only the peak repeats: the last warmup and first decay step
    assert used == [[lr, lr] for lr in expected]
    assert [r["lr"] for r in _metrics(tmp_path)] == expected


def _first_step_gradients(tmp_path, monkeypatch, grad_clip):
    grads = []
    _spy_optimizer(monkeypatch, lambda opt: grads.append(
        [p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    train(tmp_path / f"clip-{grad_clip}", DATA, TOKENIZER, replace(MODEL, dropout=0.0),
          replace(TRAIN, steps=1, grad_clip=grad_clip))
    return grads[0]


def test_grad_clip_rescales_the_gradient_the_optimizer_uses(tmp_path, monkeypatch):
    """With clipping off the first step's gradient has norm N; --grad-clip c < N hands the
    optimizer that gradient times c / N, and c > N leaves it unchanged."""
    raw = _first_step_gradients(tmp_path, monkeypatch, 0.0)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in raw))
    clip = norm / 7
    clipped = _first_step_gradients(tmp_path, monkeypatch, clip)
    for a, b in zip(clipped, raw):
        torch.testing.assert_close(a, b * (clip / norm), rtol=1e-4, atol=1e-9)
    for a, b in zip(_first_step_gradients(tmp_path, monkeypatch, norm * 2), raw):
        assert torch.equal(a, b)


def test_logged_val_loss_is_the_saved_models_eval_loss_on_held_out_text(tmp_path):
    """The validation split is one token repeated, never seen in training, so every validation
    window is the same: the logged val_loss must equal the saved model's eval-mode loss on that
    window. Dropout (0.5) left on in evaluation, or windows drawn from the training split, give
    another number."""
    tokenizer = CharTokenizer.from_text(TEXT + "z")
    z = tokenizer.encode("z")[0]
    train_ids = np.asarray(tokenizer.encode(TEXT), dtype=np.int64)
    assert z not in train_ids
    data = TokenData(train=train_ids, val=np.full(50, z, dtype=np.int64))
    model = replace(MODEL, vocab_size=tokenizer.vocab_size, dropout=0.5)
    result = train(tmp_path, data, tokenizer, model, replace(TRAIN, steps=6, eval_every=3))
    saved = load_checkpoint(tmp_path)
    window = torch.full((1, model.max_seq), z)
    with torch.no_grad():
        logits = saved.model(window)  # eval mode: no dropout
    expected = torch.nn.functional.cross_entropy(logits[0], window[0]).item()
    logged = [r["val_loss"] for r in _metrics(tmp_path) if "val_loss" in r]
    assert len(logged) == 2 and logged[-1] == result.val_loss
    assert result.val_loss == pytest.approx(expected, rel=1e-6)


# --- bad settings, stale metrics, locks, SIGTERM ---------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("grad_clip", float("nan"), "grad_clip must be a finite number, got nan"),
    ("grad_clip", float("inf"), "grad_clip must be a finite number, got inf"),
    ("grad_clip", -1.0, r"grad_clip must be >= 0 \(0 turns clipping off\), got -1.0"),
    ("weight_decay", -1.0, "weight_decay must be >= 0, got -1.0"),
    ("lr", float("inf"), "lr must be a finite number, got inf"),
    ("lr", float("nan"), "lr must be a finite number, got nan"),
    ("min_lr", float("nan"), "min_lr must be a finite number, got nan"),
    ("beta2", 1.0, r"beta2 must be in \[0, 1\), got 1.0"),
    ("seed", 2**70, "seed must be an integer from 0 to"),
    ("warmup_steps", 1.5, "warmup_steps must be an integer >= 0, got 1.5"),
])
def test_settings_that_would_train_silently_wrong_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_a_fresh_start_drops_the_metrics_of_a_failed_attempt(tmp_path):
    """An attempt that died before its first checkpoint leaves metrics; starting the run again
    under the same name must not keep them."""
    with pytest.raises(NonFiniteLossError):
        train(tmp_path / "b", DATA, TOKENIZER, MODEL,
              replace(TRAIN, lr=1e30, min_lr=0, warmup_steps=0))
    assert _metrics(tmp_path / "b") and not checkpoint_dirs(tmp_path / "b")
    train(tmp_path / "a", DATA, TOKENIZER, MODEL, TRAIN, until=3)
    train(tmp_path / "b", DATA, TOKENIZER, MODEL, TRAIN, until=3)
    assert _metrics(tmp_path / "b") == [
        {**r, "tokens_per_s": r2["tokens_per_s"], "ms_per_step": r2["ms_per_step"]}
        for r, r2 in zip(_metrics(tmp_path / "a"), _metrics(tmp_path / "b"))]
    assert len(_metrics(tmp_path / "b")) == 3


def test_a_locked_run_is_refused_naming_the_holder(tmp_path):
    from tinygpt.files import LockedError
    from tinygpt.rundir import RunDir

    with RunDir(tmp_path).lock():
        with pytest.raises(LockedError, match=rf"run directory '{tmp_path}' is in use by process "
                                              rf"{os.getpid()} "):
            train(tmp_path, DATA, TOKENIZER, MODEL, TRAIN, until=1)
    assert not checkpoint_dirs(tmp_path)
    assert train(tmp_path, DATA, TOKENIZER, MODEL, TRAIN, until=1).step == 1  # released


class _Killed(Exception):
    """Raised by the test's own SIGTERM handler: the trainer let the signal through."""


def test_sigterm_finishes_the_step_saves_and_reports(tmp_path, monkeypatch):
    """SIGTERM arriving during step 3 stops the run after step 3, saved, as Ctrl-C does; the
    handler in place before the run is back afterwards."""
    import tinygpt.train as module

    log = module._Trainer.log

    def log_then_signal(self, record):
        log(self, record)
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def killed(signum, frame):
        raise _Killed

    monkeypatch.setattr(module._Trainer, "log", log_then_signal)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        result = train(tmp_path, DATA, TOKENIZER, MODEL, TRAIN)
        assert signal.getsignal(signal.SIGTERM) is killed
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted == "SIGTERM" and result.step == 3
    assert result.checkpoint.name == "ckpt-00000003" and load_checkpoint(tmp_path).step == 3
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]
