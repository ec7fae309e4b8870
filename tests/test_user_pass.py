"""A new user's pass over the newer commands (import, export, patch, lens, experiment, heads,
inspect, generate's decoding options, finetune's LoRA options, train's variants, tokenizer,
prepare): each input below once gave a traceback, a library's raw text, a misleading sentence,
exit 0 on an option silently ignored, or a file destroyed. Now each is one sentence and exit 2,
or a note on stderr where going on is what a user wants.

One table of command -> exit code -> the one line of ours on stderr (and, where it matters,
stdout or the files afterwards), run in-process on checkpoints of several variants built once for
the module, each case on its own copy of them.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.model import TinyDecoderModel
from tinygpt.tokenizer import CharTokenizer

TEXT = 60 * "the cat sat on a mat\nand the dog ran\n"
SIZES = dict(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_seq=8)


@dataclass
class Case:
    argv: list[str]
    code: int
    err: str  # a pattern for the one line of ours on stderr ("" when stderr must stay empty)
    out: str | None = None  # a pattern stdout must match (None: empty on errors, not checked on 0)
    # A check of the files afterwards: "corpus and runs intact", "no runs.png", "nothing ran".
    then: str | None = None


def _finetune(run: str, *extra: str) -> list[str]:
    return ["finetune", "--checkpoint", f"{{dir}}/runs/{run}", "--corpus", "{dir}/corpus.txt",
            "--data-dir", "{dir}/cache", "--steps", "1", "--batch-size", "2", *extra]


def _inspect(run: str, *extra: str) -> list[str]:
    return ["inspect", "--checkpoint", f"{{dir}}/runs/{run}", "--prompt", "the cat", *extra]


def _patch(*extra: str, clean: str = "the cat", corrupted: str = "the dog") -> list[str]:
    return ["patch", "--checkpoint", "{dir}/runs/post", "--clean", clean, "--corrupted",
            corrupted, "--out", "{dir}/patch.png", *extra]


def _generate(run: str, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", f"{{dir}}/runs/{run}", "--max-new-tokens", "4", *extra]


def _import(source: str, *extra: str) -> list[str]:
    return ["import", "--from", source, "--runs-dir", "{dir}/runs", *extra]


def _resume(*extra: str) -> list[str]:
    return ["train", "--corpus", "{dir}/corpus.txt", "--data-dir", "{dir}/cache", "--runs-dir",
            "{dir}/runs", "--name", "trained", "--resume", "--config", "seed",
            *[f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()], "--batch-size", "2",
            "--eval-every", "1", "--eval-batches", "1", *extra]


def _induction(out: str, *extra: str) -> list[str]:
    return ["experiment", "induction", "--corpus", "{dir}/corpus.txt", "--data-dir",
            "{dir}/cache", "--steps", "2", "--score-every", "1", "--out", out, *extra]


ERROR = "tinygpt: error: "
NOTE = "tinygpt: note: "
CASES = {
    # --- finetune: --out used to be replaced whole, whatever it was -----------------------------
    "finetune --out an existing file": Case(
        _finetune("post", "--out", "{dir}/corpus.txt"), 2,
        ERROR + r"adapter directory '{dir}/corpus.txt' is a file; give a directory\.$",
        then="corpus and runs intact"),
    "finetune --out another run": Case(
        _finetune("post", "--out", "{dir}/runs/tiled"), 2,
        ERROR + r"'{dir}/runs/tiled' holds files that are not LoRA adapters; give a new or empty "
                r"directory for the adapters\.$", then="corpus and runs intact"),
    "finetune --lora-alpha 0 (adapters that change nothing)": Case(
        _finetune("post", "--lora-alpha", "0"), 2,
        ERROR + r"LoRA alpha must be a finite number > 0, got 0\.0\.$"),
    "finetune --lora-alpha nan (blamed on --lr)": Case(
        _finetune("post", "--lora-alpha", "nan"), 2,
        ERROR + r"LoRA alpha must be a finite number > 0, got nan\.$"),
    "finetune an MLP layer of an attention-only model (peft's text)": Case(
        _finetune("attn", "--lora-targets", "mlp.fc_in"), 2,
        ERROR + r"LoRA target 'mlp\.fc_in' is no layer of this model \(an attention-only model "
                r"has no MLP\)\.$"),
    "finetune lm_head of tied embeddings (merge changes the embedding)": Case(
        _finetune("tied", "--lora-targets", "lm_head"), 2,
        ERROR + r"LoRA target 'lm_head' cannot be merged into this model: its LM head is its "
                r"token embedding \(tie_embeddings\)"),
    # --- --lora with adapters made for another model --------------------------------------------
    "inspect --lora of a model of other sizes (traceback)": Case(
        _inspect("gqa", "--lora", "{dir}/runs/post/lora", "--out", "{dir}/a.png"), 2,
        ERROR + r"the adapters in {dir}/runs/post/lora were fine-tuned from a model of other "
                r"sizes than this checkpoint; give adapters made from it\.$"),
    "inspect --lora adapting layers the model lacks (silently dropped)": Case(
        _inspect("attn", "--lora", "{dir}/lora-mlp", "--out", "{dir}/a.png"), 2,
        ERROR + r"the adapters in {dir}/lora-mlp adapt 'mlp\.fc_in', which is no layer of this "
                r"model; they were made for another model\.$"),
    "inspect --lora on a tied LM head (merged model differs)": Case(
        _inspect("tied", "--lora", "{dir}/lora-tied", "--out", "{dir}/a.png"), 2,
        ERROR + r"the adapters in {dir}/lora-tied adapt 'lm_head', which cannot be merged"),
    # --- experiment induction: --out used to take over a run ------------------------------------
    "experiment --out a training run": Case(
        _induction("{dir}/runs/post"), 2,
        ERROR + r"--out '{dir}/runs/post' holds files that are not an earlier induction "
                r"experiment's \(such as '.+'\); give a new directory\.$",
        then="corpus and runs intact"),
    "experiment --out a file": Case(
        _induction("{dir}/corpus.txt"), 2,
        ERROR + r"--out '{dir}/corpus\.txt' is a file; give a directory for the experiment\.$",
        then="corpus and runs intact"),
    # --- generate: options that beam search ignored, misleading and raw errors -----------------
    "generate --beam --temperature (ignored)": Case(
        _generate("post", "--beam", "2", "--temperature", "0.5"), 2,
        ERROR + r"--temperature shapes the distribution tokens are sampled from; beam search "
                r"samples nothing"),
    "generate --beam --top-k (ignored)": Case(
        _generate("post", "--beam", "2", "--top-k", "3"), 2, ERROR + r"--top-k shapes the"),
    "generate --beam --top-p (ignored)": Case(
        _generate("post", "--beam", "2", "--top-p", "0.5"), 2, ERROR + r"--top-p shapes the"),
    "generate --stop with characters outside the vocabulary (can never stop)": Case(
        _generate("post", "--stop", "Q"), 0,
        NOTE + r"--stop 'Q' holds characters outside the vocabulary \('Q'\), which the model "
               r"never writes; it cannot end the text\.$"),
    "generate --temperature 1e-300 (blamed the weights)": Case(
        _generate("post", "--temperature", "1e-300"), 2,
        ERROR + r"temperature 1e-300 is so small that the logits divided by it overflow to "
                r"infinity; use 0 for greedy decoding, or a larger temperature\.$"),
    "generate --policy rolling --compile (library words)": Case(
        _generate("alibi", "--policy", "rolling", "--compile"), 2,
        ERROR + r"--policy rolling drops keys from the eager KV cache; it cannot be used with "
                r"--compile\.$"),
    "generate --compile on a tiled checkpoint (dynamo's traceback)": Case(
        _generate("tiled", "--compile"), 2,
        ERROR + r"compiled decoding needs dense attention: the tiled core plans its tiles"),
    # --- inspect and patch outputs ------------------------------------------------------------
    "inspect --out with an extension matplotlib cannot write": Case(
        _inspect("post", "--out", "{dir}/attention.txt"), 2,
        ERROR + r"--out '{dir}/attention\.txt': a figure cannot be written as '\.txt'; use one "
                r"of .*\.png"),
    "inspect --out a directory (wrote DIR.png, said DIR)": Case(
        _inspect("post", "--out", "{dir}/runs"), 2,
        ERROR + r"--out '{dir}/runs' is a directory; give a file name\.$", then="no runs.png"),
    "inspect --html a directory (raw OS text)": Case(
        _inspect("post", "--html", "{dir}/runs"), 2,
        ERROR + r"--html '{dir}/runs' is a directory; give a file name\.$"),
    "inspect --out and --html the same file": Case(
        _inspect("post", "--out", "{dir}/a.svg", "--html", "{dir}/a.svg"), 2,
        ERROR + r"--out and --html name the same file '{dir}/a\.svg'; the page would overwrite "
                r"the figure\.$"),
    "inspect --out without an extension names the file written": Case(
        _inspect("post", "--out", "{dir}/grid"), 0, "", out=r"^wrote {dir}/grid\.png\n$"),
    "inspect --out in a new directory (raw OS text)": Case(
        _inspect("post", "--out", "{dir}/new/grid.png"), 0, "",
        out=r"^wrote {dir}/new/grid\.png\n$"),
    "inspect --html below a file (raw OS text)": Case(
        _inspect("post", "--html", "{dir}/corpus.txt/page.html"), 2,
        ERROR + r"--html '{dir}/corpus\.txt/page\.html' cannot be written: '{dir}/corpus\.txt' "
                r"is a file, not a directory\.$"),
    "patch --out with an extension matplotlib cannot write": Case(
        _patch("--out", "{dir}/patch.txt"), 2, ERROR + r"--out '{dir}/patch\.txt': a figure"),
    "patch with the same clean and corrupted prompt (an all-equal map)": Case(
        _patch(corrupted="the cat"), 2,
        ERROR + r"the clean and corrupted prompts are the same tokens, so patching changes "
                r"nothing"),
    "patch --target equal to --foil (a zero metric)": Case(
        _patch("--target", "a", "--foil", "a"), 2,
        ERROR + r"--foil 'a' is the target token itself, so the logit difference is zero"),
    "patch --foil outside the vocabulary (silently <unk>)": Case(
        _patch("--foil", "Q"), 2, ERROR + r"--foil 'Q' is not in the checkpoint's vocabulary\.$"),
    # --- lens ------------------------------------------------------------------------------------
    "lens --foil without --target (ignored)": Case(
        ["lens", "--checkpoint", "{dir}/runs/post", "--prompt", "the", "--foil", "a"], 2,
        ERROR + r"--foil is subtracted from --target's logit; give --target too\.$"),
    "lens --target on a post-norm model (table printed, then the error)": Case(
        ["lens", "--checkpoint", "{dir}/runs/post", "--prompt", "the", "--target", "a"], 2,
        ERROR + r"direct logit attribution needs a pre-norm model"),
    "lens --target outside the vocabulary (silently <unk>)": Case(
        ["lens", "--checkpoint", "{dir}/runs/tied", "--prompt", "the", "--target", "Q"], 2,
        ERROR + r"--target 'Q' is not in the checkpoint's vocabulary\.$"),
    # --- import --------------------------------------------------------------------------------
    "import --name a/b (a run two levels deep)": Case(
        _import("nanogpt:{dir}/nano/ckpt.pt", "--name", "a/b"), 2,
        ERROR + r"run name 'a/b' must be one plain directory name"),
    "import --name .. (said: already exists)": Case(
        _import("nanogpt:{dir}/nano/ckpt.pt", "--name", ".."), 2,
        ERROR + r"run name '\.\.' must be one plain directory name"),
    "import --name '' (silently the default name)": Case(
        _import("nanogpt:{dir}/nano/ckpt.pt", "--name", ""), 2,
        ERROR + r"run name '' must be one plain directory name"),
    "import --runs-dir a file (raw OS text)": Case(
        ["import", "--from", "nanogpt:{dir}/nano/ckpt.pt", "--runs-dir", "{dir}/corpus.txt"], 2,
        ERROR + r"--runs-dir '{dir}/corpus\.txt' is a file; give a directory\.$"),
    "train --runs-dir a file (raw OS text)": Case(
        ["train", "--corpus", "{dir}/corpus.txt", "--data-dir", "{dir}/cache", "--runs-dir",
         "{dir}/corpus.txt", "--config", "seed", "--name", "q"], 2,
        ERROR + r"--runs-dir '{dir}/corpus\.txt' is a file; give a directory\.$"),
    "import an empty nanoGPT file (EOFError)": Case(
        _import("nanogpt:{dir}/empty.pt", "--name", "e"), 2,
        ERROR + r"cannot read '{dir}/empty\.pt' as a nanoGPT checkpoint: the file is empty\.$"),
    "import a text file as nanoGPT (a bare '101')": Case(
        _import("nanogpt:{dir}/corpus.txt", "--name", "t"), 2,
        ERROR + r"cannot read '{dir}/corpus\.txt' as a nanoGPT checkpoint: it is not a file "
                r"that torch\.save wrote, or it is damaged\.$"),
    "import a nanoGPT file whose pickle runs code (torch's advice to turn the check off)": Case(
        _import("nanogpt:{dir}/evil.pt", "--name", "v"), 2,
        ERROR + r"cannot read '{dir}/evil\.pt' as a nanoGPT checkpoint: it holds objects other "
                r"than plain tensors and data, and unpickling them could run code\.$",
        then="nothing ran"),
    "import nanoGPT without meta.pkl (named a flag that does not exist)": Case(
        _import("nanogpt:{dir}/bare/ckpt.pt", "--name", "b"), 2,
        ERROR + r"{dir}/bare/ckpt\.pt has no meta\.pkl beside it; .* with --tokenizer-path "
                r"DIR\.$"),
    # --- tokenizer, train, prepare ---------------------------------------------------------------
    "tokenizer train --out a directory (raw OS text with a temporary name)": Case(
        ["tokenizer", "train", "--corpus", "{dir}/corpus.txt", "--vocab-size", "260", "--out",
         "{dir}/runs"], 2, ERROR + r"--out '{dir}/runs' is a directory; give a file name\.$"),
    "tokenizer train --vocab-size more than the corpus gives (not a word)": Case(
        ["tokenizer", "train", "--corpus", "{dir}/corpus.txt", "--vocab-size", "5000", "--out",
         "{dir}/bpe.json"], 0,
        NOTE + r"the corpus gave \d+ tokens, fewer than --vocab-size 5000: no pair of adjacent "
               r"tokens is left in it to merge\.$"),
    "prepare --tinyshakespeare a file that is not it (two hashes, no meaning)": Case(
        ["prepare", "--corpus", "tinyshakespeare", "--tinyshakespeare", "{dir}/corpus.txt",
         "--data-dir", "{dir}/cache"], 2,
        ERROR + r"{dir}/corpus\.txt has sha256 [0-9a-f]{{64}}, expected [0-9a-f]{{64}}: it is not "
                r"Tiny Shakespeare's input\.txt, or a damaged copy of it\.$"),
    "train --tokenizer a directory (raw OS text)": Case(
        ["train", "--corpus", "{dir}/corpus.txt", "--tokenizer", "{dir}/runs"], 2,
        ERROR + r"tokenizer file '{dir}/runs' is a directory; give the JSON file a tokenizer was "
                r"saved to\.$"),
    "train --tokenizer another library's JSON (named no file)": Case(
        ["train", "--corpus", "{dir}/corpus.txt", "--tokenizer", "{dir}/foreign.json"], 2,
        ERROR + r"tokenizer file '{dir}/foreign\.json' is not a TinyGPT tokenizer: unknown "
                r"tokenizer type None"),
    "prepare --data-dir a file (raw OS text)": Case(
        ["prepare", "--corpus", "{dir}/corpus.txt", "--data-dir", "{dir}/corpus.txt"], 2,
        ERROR + r"--data-dir '{dir}/corpus\.txt' is a file; give a directory\.$"),
    "prepare --url with a corpus file (ignored)": Case(
        ["prepare", "--corpus", "{dir}/corpus.txt", "--url", "http://127.0.0.1:9/x"], 0,
        NOTE + r"--url is read only with --corpus tinyshakespeare; it is ignored for --corpus "
               r"{dir}/corpus\.txt\.$"),
    "train --resume past --steps (nothing trained, not a word)": Case(
        _resume("--steps", "1"), 0,
        NOTE + r"the run is already at step 2, and --steps 1 plans no step beyond it; nothing "
               r"is trained"),
    "train --resume at exactly --steps (nothing trained, not a word)": Case(
        _resume("--steps", "2"), 0,
        NOTE + r"the run is already at step 2, and --steps 2 plans no step beyond it; nothing "
               r"is trained"),
    "train --resume with other training options (flags not given again take defaults)": Case(
        _resume("--steps", "3", "--lr", "0.01", "--pack-documents", "\n"), 0,
        NOTE + r"resuming with other training options than the checkpoint's \(--lr 0\.001 -> "
               r"0\.01, --pack-documents none -> '\\n'\); give the run's own to continue it "
               r"exactly\.$"),
    "inspect a prompt with characters outside the vocabulary (silently <unk>)": Case(
        ["inspect", "--checkpoint", "{dir}/runs/post", "--prompt", "the cat!", "--out",
         "{dir}/a.png"], 0,
        NOTE + r"characters of the prompt outside the vocabulary became <unk>: '!'$"),
    "lens a prompt with characters outside the vocabulary (silently <unk>)": Case(
        ["lens", "--checkpoint", "{dir}/runs/post", "--prompt", "the cat!"], 0,
        NOTE + r"characters of the prompt outside the vocabulary became <unk>: '!'$"),
    "export below a file (raw OS text)": Case(
        ["export", "--checkpoint", "{dir}/runs/tied", "--to", "hf", "{dir}/corpus.txt/out"], 2,
        ERROR + r"OUT '{dir}/corpus\.txt/out' cannot be written: '{dir}/corpus\.txt' is a file, "
                r"not a directory\.$"),
    "finetune --out below a file (raw OS text)": Case(
        _finetune("post", "--out", "{dir}/corpus.txt/lora"), 2,
        ERROR + r"--out '{dir}/corpus\.txt/lora' cannot be written: '{dir}/corpus\.txt' is a "
                r"file"),
    # What the operating system refuses past every check (/proc takes no new files) is its
    # words, in a sentence that names the file, not Python's "[Errno 2] ...".
    "inspect --html where the system refuses to create a file": Case(
        _inspect("post", "--html", "/proc/tinygpt-page.html"), 2,
        ERROR + r"cannot use '/proc/tinygpt-page\.html': no such file or directory\.$"),
}


def _save(root: Path, name: str, tokenizer: CharTokenizer, **fields) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **{**SIZES, **fields})
    save_checkpoint(root / "runs" / name, model=TinyDecoderModel(config), tokenizer=tokenizer,
                    step=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Runs of several variants (post-norm trained for 2 steps, with adapters; pre-norm with tied
    embeddings; attention-only; grouped KV heads; ALiBi; tiled), adapters of an MLP layer and of
    a tied LM head, and nanoGPT files: one that loads, one without its meta.pkl, an empty one and
    one whose pickle would run code."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("userpass")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    train = ["train", "--corpus", str(root / "corpus.txt"), "--data-dir", str(root / "cache"),
             "--runs-dir", str(root / "runs"), "--config", "seed", "--steps", "2",
             "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1",
             *[f"--{k.replace('_', '-')}={v}" for k, v in SIZES.items()]]
    assert main([*train, "--name", "trained"]) == 0
    tokenizer = load_checkpoint(root / "runs" / "trained").tokenizer
    _save(root, "post", tokenizer)
    _save(root, "tied", tokenizer, norm_first=True, tie_embeddings=True, head_bias=False)
    _save(root, "attn", tokenizer, attn_only=True)
    _save(root, "gqa", tokenizer, n_heads=4, n_kv_heads=2)
    _save(root, "alibi", tokenizer, position="alibi")
    _save(root, "tiled", tokenizer, attention_impl="tiled")
    finetune = ["finetune", "--corpus", str(root / "corpus.txt"), "--data-dir",
                str(root / "cache"), "--steps", "1", "--batch-size", "2"]
    assert main([*finetune, "--checkpoint", str(root / "runs" / "post")]) == 0
    assert main([*finetune, "--checkpoint", str(root / "runs" / "post"), "--out",
                 str(root / "lora-mlp"), "--lora-targets", "mlp.fc_in"]) == 0
    tied = load_checkpoint(root / "runs" / "tied").model  # what peft does, unchecked
    get_peft_model(tied, LoraConfig(r=2, target_modules=["lm_head"])).save_pretrained(
        str(root / "lora-tied"))
    (root / "empty.pt").write_bytes(b"")
    torch.save({"model": _CreatesAFile(root / "pwned"), "model_args": {}}, root / "evil.pt")
    _write_nanogpt(root / "nano", meta=True)
    _write_nanogpt(root / "bare", meta=False)
    (root / "foreign.json").write_text(json.dumps({"model": {"type": "BPE"}}), encoding="utf-8")
    return root


class _CreatesAFile:
    """Unpickled, it would create `path`: what a checkpoint that runs code does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _write_nanogpt(directory: Path, *, meta: bool) -> None:
    """A one-layer nanoGPT `ckpt.pt` (nn.Linear layout, tied head) over the characters 'abcde',
    with their `meta.pkl` beside it when `meta`."""
    sizes = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=5, bias=True)
    shapes = {"wte": (5, 8), "wpe": (8, 8), "ln_f": (8,), "h.0.ln_1": (8,), "h.0.ln_2": (8,),
              "h.0.attn.c_attn": (24, 8), "h.0.attn.c_proj": (8, 8), "h.0.mlp.c_fc": (32, 8),
              "h.0.mlp.c_proj": (8, 32)}
    state, generator = {}, torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        state[f"transformer.{name}.weight"] = torch.randn(shape, generator=generator) * 0.1
        if name not in ("wte", "wpe"):
            state[f"transformer.{name}.bias"] = torch.zeros(shape[0])
    directory.mkdir()
    torch.save({"model": state, "model_args": sizes}, directory / "ckpt.pt")
    if meta:
        chars = "abcde"
        (directory / "meta.pkl").write_bytes(pickle.dumps({
            "vocab_size": 5, "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}))


def _snapshot(root: Path) -> dict[str, bytes]:
    kept = [root / "corpus.txt", *sorted((root / "runs").rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in kept if p.is_file()}


@pytest.mark.parametrize("name", CASES)
def test_command_exit_code_and_message(name, built, tmp_path, capsys, monkeypatch):
    """Each case on its own copy of the runs and files (a case that fails its check must not
    take the files of the next ones with it)."""
    case = CASES[name]
    monkeypatch.delenv("TINYGPT_DEBUG", raising=False)
    shutil.copytree(built, tmp_path, dirs_exist_ok=True)
    root = tmp_path
    before = _snapshot(root) if case.then == "corpus and runs intact" else None
    argv = [a.format(dir=root) for a in case.argv]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    pattern = case.err.format(dir=re.escape(str(root)))
    said = [line for line in re.split(r"[\r\n]", err) if line.startswith("tinygpt:")]
    assert code == case.code, err[-2000:]
    assert "Traceback" not in err and "Warning" not in err, err[-2000:]
    if pattern:  # one line of ours (a progress bar may share stderr), and what it says
        assert len(said) == 1 and re.search(pattern, said[0]), err[-2000:]
    else:
        assert err == "", err[-2000:]
    if case.out is not None:
        assert re.search(case.out.format(dir=re.escape(str(root))), out), out
    elif case.code != 0:
        assert out == "", out
    if before is not None:
        assert _snapshot(root) == before
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    if case.then == "no runs.png":
        assert not (root / "runs.png").exists()
    if case.then == "nothing ran":
        assert not (root / "pwned").exists() and not (built / "pwned").exists()


def test_an_experiment_run_again_replaces_the_earlier_one_whole(built, tmp_path, monkeypatch,
                                                                capsys):
    """A second run of the experiment into the same --out leaves its own files only: before, the
    first run's checkpoint (of another step) stayed beside the new one, and one of the same step
    was kept instead of the new one, while the command said it wrote it."""
    import tinygpt.experiments.induction as induction

    small = functools.partial(induction.InductionSettings, batch_size=4, d_model=16, max_seq=16,
                              eval_windows=2)
    monkeypatch.setattr(induction, "InductionSettings", small)
    out = tmp_path / "induction"
    for steps, seed in (("2", "0"), ("1", "0"), ("1", "1")):
        argv = [a.format(dir=built) for a in _induction(str(out), "--seed", seed)]
        argv[argv.index("--steps") + 1] = steps
        assert main(argv) == 0
        assert f"and {out}/ckpt-0000000{steps}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-00000001", "induction.png",
                                                     "metrics.jsonl", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 1
    meta = json.loads((out / "ckpt-00000001" / "meta.json").read_text())
    assert meta["experiment"]["settings"]["seed"] == 1  # the checkpoint of the last run
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
