"""`tinygpt prepare | tokenizer train | train | generate`: the happy paths, and every bad input
ending in one line on stderr, exit code 2 and no traceback."""

import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys

import pytest
from corpora import synthetic_text

from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main

TEXT, _ = synthetic_text("uniform", 3000, n_symbols=6, seed=2)
TINY = ["--config", "seed", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-ff", "32",
        "--max-seq", "8", "--seed-input-scale", "false", "--batch-size", "4", "--eval-every", "2",
        "--eval-batches", "1"]


def _train_args(tmp_path, corpus, *extra):
    return ["train", "--corpus", str(corpus), "--data-dir", str(tmp_path / "cache"),
            "--runs-dir", str(tmp_path / "runs"), "--name", "r", *TINY, *extra]


def _fails(argv, capsys, pattern):
    """Exit code 2 and one error line on stderr (after any progress bar), matching `pattern`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    message = re.split(r"[\r\n]", err.rstrip("\n"))[-1]
    assert err.count("tinygpt: error: ") == 1 and message.startswith("tinygpt: error: "), err
    assert "Traceback" not in err and re.search(pattern, message), err


def _rehash(checkpoint, name):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest[name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 4-step run that the tests copy before damaging."""
    tmp_path = tmp_path_factory.mktemp("trained")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    assert main(_train_args(tmp_path, corpus, "--steps", "4")) == 0
    return tmp_path


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_train_writes_run_and_generate_reads_it(run, capsys):
    run_dir = run / "runs" / "r"
    assert load_checkpoint(run_dir).step == 4
    assert (run_dir / "loss_curve.png").exists()
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main(["generate", "--runs-dir", str(run / "runs"), "--max-new-tokens", "20",
                 "--prompt", "a"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a") and len(out.rstrip("\n")) == 21
    assert set(out.rstrip("\n")) <= set(TEXT) | {"\n", "\N{REPLACEMENT CHARACTER}"}


def test_resume_continues_the_run(run, capsys):
    assert main(_train_args(run, run / "corpus.txt", "--steps", "6", "--resume")) == 0
    assert load_checkpoint(run / "runs" / "r").step == 6


def test_bpe_tokenizer_train_then_train_with_it(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 60)
    out = tmp_path / "bpe.json"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
                 "--out", str(out)]) == 0
    assert main(_train_args(tmp_path, corpus, "--steps", "2", "--tokenizer", str(out))) == 0
    ckpt = load_checkpoint(tmp_path / "runs" / "r")
    assert ckpt.tokenizer.kind == "bpe"
    # The corpus runs out of pairs to merge before 300: the model takes the tokenizer's real size.
    assert 256 < ckpt.tokenizer.vocab_size == ckpt.config.vocab_size <= 300


def test_prepare_reports_a_path_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    assert main(["prepare", "--corpus", str(corpus)]) == 0
    assert "3,000 bytes, 6 distinct characters" in capsys.readouterr().out


# --- bad input -------------------------------------------------------------------------------

def test_missing_corpus(tmp_path, capsys):
    _fails(_train_args(tmp_path, tmp_path / "nope.txt"), capsys,
           "nope.txt' is neither a file nor one of")


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    _fails(_train_args(tmp_path, tmp_path / "empty.txt"), capsys, "is empty")


def test_corpus_too_short_for_a_window(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("abcdefghij" * 5)  # 45 train tokens, 5 validation tokens
    _fails(_train_args(tmp_path, tmp_path / "short.txt"), capsys,
           r"validation split has 5 tokens, fewer than one window of max_seq \+ 1 = 9")


def test_non_utf8_corpus(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    _fails(_train_args(tmp_path, tmp_path / "bad.txt"), capsys, r"not UTF-8: byte 0xff at offset 6")


def test_unknown_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "gpt5"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'gpt5'" in capsys.readouterr().err.splitlines()[-1]


def test_unknown_config_field(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--d-embed", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --d-embed 3" in capsys.readouterr().err.splitlines()[-1]


def test_invalid_config_value(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    _fails(_train_args(tmp_path, tmp_path / "c.txt", "--n-heads", "3"), capsys,
           r"d_model \(16\) must be divisible by n_heads \(3\)")


def test_vocab_size_disagreeing_with_tokenizer(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    _fails(_train_args(tmp_path, tmp_path / "c.txt", "--vocab-size", "99"), capsys,
           "--vocab-size 99 does not match the tokenizer's vocab_size 7")


def test_resume_with_different_config(run, capsys):
    _fails(_train_args(run, run / "corpus.txt", "--steps", "6", "--resume", "--d-ff", "64"), capsys,
           "cannot resume: the checkpoint has d_ff=32 but this run asks for d_ff=64")


def test_resume_with_different_tokenizer(run, capsys):
    other = run / "other.txt"
    other.write_text(TEXT.translate(str.maketrans("abcdef", "uvwxyz")))  # same vocab size
    _fails(_train_args(run, other, "--steps", "6", "--resume"), capsys, "another tokenizer")


def test_resume_on_another_corpus_names_the_tokenizer_not_the_vocabulary_size(run, capsys):
    """The corpus decides a character tokenizer, and with it vocab_size: the message says so
    rather than that the config's vocab_size differs."""
    other = run / "larger.txt"
    other.write_text(TEXT + "XYZ")
    _fails(_train_args(run, other, "--steps", "6", "--resume"), capsys,
           r"another tokenizer \(7 tokens; this run's has 10\); resume with the run's own "
           r"corpus and tokenizer")


def test_new_run_over_existing_one(run, capsys):
    _fails(_train_args(run, run / "corpus.txt", "--steps", "6"), capsys, "already has checkpoints")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_checkpoint_with_file_missing(run, capsys, name):
    (run / "runs" / "r" / "ckpt-00000004" / name).unlink()
    _fails(["generate", "--runs-dir", str(run / "runs")], capsys, f"is missing {name}")


def test_checkpoint_with_file_altered(run, capsys):
    weights = run / "runs" / "r" / "ckpt-00000004" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    _fails(["generate", "--checkpoint", str(run / "runs" / "r")], capsys,
           "model.safetensors' was altered")


def test_checkpoint_with_malicious_pickle(run, capsys):
    checkpoint = run / "runs" / "r" / "ckpt-00000004"
    marker = run / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (checkpoint / "state.pt").write_bytes(pickle.dumps({"optimizer": Exploit()}))
    _rehash(checkpoint, "state.pt")
    _fails(_train_args(run, run / "corpus.txt", "--steps", "6", "--resume"), capsys,
           "state.pt holds something other than tensors and plain data; refusing to load it")
    assert not marker.exists()


def test_generate_without_runs(tmp_path, capsys):
    _fails(["generate", "--runs-dir", str(tmp_path)], capsys, "no run with a checkpoint")


def test_non_finite_loss(run, capsys):
    _fails(_train_args(run, run / "corpus.txt", "--steps", "50", "--resume", "--lr", "1e30",
                       "--min-lr", "0", "--warmup-steps", "0", "--save-every", "1000"),
           capsys, r"loss became nan .*ckpt-00000004")
    assert load_checkpoint(run / "runs" / "r").step == 4


def test_bad_input_has_no_traceback_end_to_end(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    command = [sys.executable, "-m", "tinygpt", *_train_args(tmp_path, tmp_path / "empty.txt")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"tinygpt: error: corpus file '{tmp_path / 'empty.txt'}' is empty."]
