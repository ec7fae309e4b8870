"""The command line as a whole: one meaning, one default per flag in every command; bad input as
one line on stderr with exit code 2 (a traceback only under --debug or TINYGPT_DEBUG); command
modules that never import one another; the program entry point."""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import keyword
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import tinygpt.cli as cli
from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import build_parser, main
from tinygpt.tokenizer import CharTokenizer

CLI_DIR = Path(cli.__file__).parent
TEXT = 40 * "ROMEO:\nabc de fg\n"


def command_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict:
    """{"tokenizer train": parser, ...}: every command reachable from `parser`, aliases included."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                below = command_parsers(child, (*path, name))
                found.update(below or {" ".join((*path, name)): child})
    return found


def flag_conflicts(parsers: dict) -> list[str]:
    """Every flag that takes different values, or has a different default where it is optional,
    in two commands."""
    actions = defaultdict(dict)
    for command, parser in parsers.items():
        for action in parser._actions:
            for flag in action.option_strings:
                actions[flag][command] = action
    problems = []
    for flag, by_command in sorted(actions.items()):
        shapes = {command: (type(a).__name__, a.type, a.choices and tuple(a.choices), a.nargs,
                            a.const) for command, a in by_command.items()}
        defaults = {command: repr(a.default) for command, a in by_command.items() if not a.required}
        if len(set(shapes.values())) > 1:
            problems.append(f"{flag} takes different values: {shapes}")
        if len(set(defaults.values())) > 1:
            problems.append(f"{flag} has different defaults: {defaults}")
    return problems


def test_every_flag_has_one_meaning_and_one_default_in_every_command():
    parsers = command_parsers(build_parser())
    assert flag_conflicts(parsers) == []
    # The check has something to hold: the shared groups really are shared.
    shared = defaultdict(set)
    for parser in parsers.values():
        for action in parser._actions:
            for flag in action.option_strings:
                shared[flag].add(id(parser))
    for flag in ("--checkpoint", "--runs-dir", "--device", "--seed", "--compile", "--corpus",
                 "--config", "--steps", "--lr", "--out"):
        assert len(shared[flag]) >= 2, flag


def test_the_flag_check_catches_a_disagreeing_default_or_choice_order():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    one, two = commands.add_parser("one"), commands.add_parser("two")
    one.add_argument("--seed", type=int, default=0)
    two.add_argument("--seed", type=int, default=1337)
    one.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    two.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    problems = flag_conflicts(command_parsers(parser))
    assert [p.split()[0] for p in problems] == ["--device", "--seed"], problems


# --- bad input: one line and exit code 2, a traceback only when asked for -------------------------

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """{tmp}: a scratch directory; {run}: a tiny run with one checkpoint; corpus.txt, empty.txt."""
    tmp = tmp_path_factory.mktemp("cli")
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, max_seq=8))
    save_checkpoint(tmp / "runs" / "tiny", model=model, tokenizer=tokenizer, step=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))  # a diverged run: every logit is NaN
    save_checkpoint(tmp / "runs" / "nan", model=model, tokenizer=tokenizer, step=1)
    (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    (tmp / "one.txt").write_text("x", encoding="utf-8")
    shutil.copytree(tmp / "runs" / "tiny", tmp / "runs" / "listed")
    for manifest in (tmp / "runs" / "listed").glob("ckpt-*/manifest.json"):
        manifest.write_text("[]", encoding="utf-8")  # valid JSON, but not a table of hashes
    _altered_copy(tmp / "runs" / "tiny", tmp / "runs" / "badstep", "meta.json",
                  json.dumps({"format": 1, "step": "x"}).encode())
    _altered_copy(tmp / "runs" / "tiny", tmp / "runs" / "evil", "state.pt", _code_running_pickle())
    return {"tmp": str(tmp), "run": str(tmp / "runs" / "tiny"), "nan": str(tmp / "runs" / "nan")}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _code_running_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"optimizer": _RunsCode()}, buffer)
    return buffer.getvalue()


def _altered_copy(run, copy, name: str, blob: bytes) -> None:
    """A copy of `run` whose checkpoint file `name` holds `blob`, its manifest updated to match:
    what only a deliberate edit (or a bug) can produce, past the manifest's check."""
    shutil.copytree(run, copy)
    for ckpt in copy.glob("ckpt-*"):
        (ckpt / name).write_bytes(blob)
        manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
        manifest[name] = hashlib.sha256(blob).hexdigest()
        (ckpt / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


# command line -> exit code -> the last line on stderr (after "tinygpt: error: " for our errors)
BAD_INPUT = [
    (["summary", "--config", "seed", "--n-heads", "5"], 2,
     r"d_model \(32\) must be divisible by n_heads \(5\)\.$"),
    (["prepare", "--corpus", "{tmp}/nope.txt"], 2, r"nope\.txt' is neither a file nor one of"),
    (["tokenizer", "train", "--corpus", "{tmp}/empty.txt", "--vocab-size", "300",
      "--out", "{tmp}/bpe.json"], 2, r"empty\.txt' is empty\.$"),
    (["train", "--corpus", "{tmp}/empty.txt", "--data-dir", "{tmp}/cache",
      "--runs-dir", "{tmp}/runs"], 2, r"empty\.txt' is empty\.$"),
    (["train", "--corpus", "{tmp}/corpus.txt", "--compile", "aot_eager"], 2,
     r"training compiles with the inductor backend only, got --compile aot_eager\.$"),
    (["generate", "--runs-dir", "{tmp}/no-runs"], 2, r"no run with a checkpoint under"),
    (["sample", "--run", "{tmp}/nope"], 2, r"nope' does not exist\.$"),
    (["generate", "--checkpoint", "{run}", "--temperature", "-1"], 2,
     r"temperature must be a finite number"),
    (["heads", "--checkpoint", "{run}", "--corpus", "{tmp}/corpus.txt", "--val-fraction", "0"], 2,
     r"val_fraction must be in \(0, 1\], got 0\.0\.$"),
    (["inspect", "--checkpoint", "{run}", "--prompt", "RO"], 2, r"give --out FILE\.png"),
    (["finetune", "--checkpoint", "{run}", "--corpus", "{tmp}/corpus.txt",
      "--lora-targets", "qkv"], 2, r"unknown LoRA target 'qkv'"),
    # a corpus too short for one window: said in words, not "cannot mmap an empty file"
    (["train", "--corpus", "{tmp}/one.txt", "--data-dir", "{tmp}/cache-one",
      "--runs-dir", "{tmp}/runs-one", "--config", "seed"], 2,
     r"the train split has 0 tokens, fewer than one window of max_seq \+ 1"),
    (["heads", "--checkpoint", "{run}", "--corpus", "{tmp}/corpus.txt", "--data-dir",
      "{tmp}/cache", "--windows", "0"], 2,
     r"the number of windows must be an integer >= 1, got 0\.$"),
    (["heads", "--checkpoint", "{run}", "--corpus", "{tmp}/corpus.txt", "--data-dir",
      "{tmp}/cache", "--windows", "-3"], 2,
     r"the number of windows must be an integer >= 1, got -3\.$"),
    (["heads", "--checkpoint", "{run}", "--corpus", "{tmp}/corpus.txt", "--data-dir",
      "{tmp}/cache", "--threshold", "nan"], 2, r"threshold must be a number in \[0, 1\], got nan"),
    (["generate", "--checkpoint", "{tmp}/corpus.txt"], 2,
     r"--checkpoint '.*corpus\.txt' is a file; give a run directory or one checkpoint directory"),
    (["generate", "--checkpoint", "{run}", "--beam", "2", "--stop", "a"], 2,
     r"--stop ends sampled text; beam search .* cannot be used with it\.$"),
    (["generate", "--checkpoint", "{nan}", "--temperature", "0", "--max-new-tokens", "3"], 2,
     r"the model's logits are NaN, so no next token can be chosen"),
    (["generate", "--checkpoint", "{nan}", "--max-new-tokens", "3"], 2,
     r"the model's logits are NaN, so no next token can be chosen"),
    (["generate", "--checkpoint", "{nan}", "--beam", "2", "--max-new-tokens", "3"], 2,
     r"the model's logits are NaN, so no next token can be chosen"),
    (["generate", "--checkpoint", "{tmp}/runs/listed"], 2,
     r"manifest\.json' is not a JSON object of file hashes\.$"),
    (["generate", "--checkpoint", "{tmp}/runs/badstep"], 2,
     r"badstep/ckpt-\d+/meta\.json must record the step as an integer >= 0, got 'x'\.$"),
    (["train", "--corpus", "{tmp}/corpus.txt", "--data-dir", "{tmp}/cache", "--runs-dir",
      "{tmp}/runs", "--name", "evil", "--resume", "--config", "seed", "--max-seq", "8"], 2,
     r"state\.pt holds something other than tensors and plain data; refusing to load it, as "
     r"unpickling it could run code\.$"),
]
USAGE_ERRORS = [  # argparse's own: usage, then "tinygpt COMMAND: error: ..."
    (["generate", "--device", "gpu"], 2, r"argument --device: invalid choice: 'gpu'"),
    (["generate", "--max-new", "3"], 2, r"unrecognized arguments: --max-new 3"),  # no prefixes
    (["tokenizer", "train", "--out", "x.json"], 2, r"required: --vocab-size"),
    (["generate", "--compile", "nosuch"], 2, r"unknown torch.compile backend 'nosuch'"),
    (["generate", "--seed", "99999999999999999999999"], 2,
     r"argument --seed: expected an integer from 0 to 2\*\*63 - 1, got '99999999999999999999999'"),
    (["train", "--seed", "-1"], 2, r"argument --seed: expected an integer from 0 to 2\*\*63 - 1"),
]


def invoke(capsys, argv, paths):
    argv = [part.format(**paths) for part in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, code, pattern", BAD_INPUT, ids=[a[0] for a, _, _ in BAD_INPUT])
def test_bad_input_is_one_line_with_its_exit_code(capsys, monkeypatch, paths, argv, code, pattern):
    monkeypatch.delenv("TINYGPT_DEBUG", raising=False)
    got, out, err = invoke(capsys, argv, paths)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tinygpt: error: ") and re.search(pattern, err.rstrip("\n")), err


@pytest.mark.parametrize("argv, code, pattern", USAGE_ERRORS,
                         ids=[a[0] for a, _, _ in USAGE_ERRORS])
def test_usage_errors_are_argparses_with_exit_code_2(capsys, paths, argv, code, pattern):
    got, out, err = invoke(capsys, argv, paths)
    assert (got, out) == (code, "")
    assert re.search(pattern, err.splitlines()[-1]) and "Traceback" not in err, err


@pytest.mark.parametrize("how", ["--debug", "TINYGPT_DEBUG=1"])
@pytest.mark.parametrize("argv, code, pattern", BAD_INPUT, ids=[a[0] for a, _, _ in BAD_INPUT])
def test_debug_shows_the_traceback_and_keeps_the_line(capsys, monkeypatch, paths, how, argv,
                                                      code, pattern):
    if how == "--debug":
        monkeypatch.delenv("TINYGPT_DEBUG", raising=False)
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("TINYGPT_DEBUG", "1")
    got, out, err = invoke(capsys, argv, paths)
    assert (got, out) == (code, "")
    last = err.rstrip("\n").splitlines()[-1]
    assert err.startswith("Traceback (most recent call last):"), err
    assert last.startswith("tinygpt: error: ") and re.search(pattern, last), err


@pytest.mark.parametrize("value", ["", "0"])
def test_debug_variable_off_values_show_no_traceback(capsys, monkeypatch, paths, value):
    monkeypatch.setenv("TINYGPT_DEBUG", value)
    got, _, err = invoke(capsys, BAD_INPUT[0][0], paths)
    assert got == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_debug_variable_in_a_fresh_process_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "tinygpt", "summary", "--config", "seed", "--n-heads", "3"]
    env = {**os.environ, "TINYGPT_DEBUG": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.splitlines()[-1] == (
        "tinygpt: error: d_model (32) must be divisible by n_heads (3).")


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """`tinygpt summary | head -1`: the reader leaves before anything is written, so every write
    fails; the command stops with SIGPIPE's exit code and writes nothing to stderr."""
    command = [sys.executable, "-m", "tinygpt", "summary", "--config", "gpt2"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    child.stdout.close()  # before the child has imported torch, let alone printed
    err = child.stderr.read()
    assert child.wait(timeout=120) == 141 and err == ""


def test_an_unexpected_error_is_a_bug_and_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli.summary, "handle", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["summary"])


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.summary, "handle", interrupted)
    assert main(["summary"]) == 130
    assert capsys.readouterr().err == "tinygpt: interrupted\n"


def test_generate_refuses_a_checkpoint_too_large_for_memory_unless_forced(capsys, monkeypatch,
                                                                       paths):
    monkeypatch.setattr(cli.options, "available_memory", lambda: 1000)
    argv = ["generate", "--checkpoint", paths["run"], "--max-new-tokens", "3"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "tinygpt: error: a model of 18,319 parameters needs 0.07 MiB for its weights, more than "
        "the 0.00 MiB of memory available; choose a smaller config or pass --force.\n")
    assert main([*argv, "--force"]) == 0


def test_ctrl_c_while_sampling_prints_the_text_drawn_so_far(capsys, monkeypatch, paths):
    def interrupted_stream(*args, **kwargs):
        yield "abc"
        yield " de"
        raise KeyboardInterrupt

    monkeypatch.setattr("tinygpt.generate.stream", interrupted_stream)
    argv = ["generate", "--checkpoint", paths["run"], "--prompt", "RO"]
    assert main(argv) == 130
    assert capsys.readouterr() == ("ROabc de\n", "tinygpt: interrupted\n")
    assert main([*argv, "--stream"]) == 130
    assert capsys.readouterr() == ("ROabc de", "tinygpt: interrupted\n")


# --- the shape of the package -------------------------------------------------------------------

def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, relative imports resolved against
    tinygpt.cli, and `from package import name` counted as `package.name` too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["tinygpt", "cli"][:3 - node.level] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _command_modules() -> set[str]:
    return {f"tinygpt.cli.{p.stem}" for p in CLI_DIR.glob("*.py")} - {
        "tinygpt.cli.__init__", "tinygpt.cli.options"}


def test_no_module_of_the_cli_imports_a_command_module():
    commands = _command_modules()
    assert len(commands) >= 8
    for path in sorted(CLI_DIR.glob("*.py")):
        if path.stem != "__init__":
            assert not _imported_modules(path) & commands, path.name


def test_the_import_check_sees_absolute_and_relative_imports(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from tinygpt.cli import options, generate\nfrom .heads import handle\n"
                       "import tinygpt.cli.train\n")
    assert _imported_modules(planted) & _command_modules() == {
        "tinygpt.cli.generate", "tinygpt.cli.heads", "tinygpt.cli.train"}


def test_every_command_module_is_listed_and_handles_the_commands_it_registers():
    assert {module.__name__ for module in cli.COMMANDS} == _command_modules()
    for command, parser in command_parsers(build_parser()).items():
        handler = parser.get_default("func")
        owner = "generate" if command == "sample" else command.split()[0]
        owner += "_" if keyword.iskeyword(owner) else ""  # `import` lives in cli/import_.py
        assert handler.__module__ == f"tinygpt.cli.{owner}", command


# --- old spellings and the unified defaults -------------------------------------------------------

def test_sample_and_the_old_flag_spellings_reach_generate(capsys, paths):
    new = ["generate", "--checkpoint", paths["run"], "--prompt", "RO", "--max-new-tokens", "12"]
    old = ["sample", "--run", paths["run"], "--prompt", "RO", "--tokens", "12"]
    assert main(new) == 0
    expected = capsys.readouterr().out
    assert main(old) == 0
    assert capsys.readouterr().out == expected
    assert len(expected) == len("RO") + 12 + 1


def test_generate_is_reproducible_by_default_and_the_seed_changes_it(capsys, paths):
    argv = ["generate", "--checkpoint", paths["run"], "--max-new-tokens", "30"]
    texts = []
    for extra in ([], [], ["--seed", "1"]):
        assert main([*argv, *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]


# --- the program entry point --------------------------------------------------------------------

def test_the_program_keeps_freed_memory_and_main_alone_does_not(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept") or True)
    assert cli.main(["summary", "--config", "seed"]) == 0
    assert calls == []  # a caller of main (a test, a notebook) keeps its process as it was
    monkeypatch.setattr(sys, "argv", ["tinygpt", "summary", "--config", "seed"])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 0 and calls == ["kept"]
    assert "total                   20,712" in capsys.readouterr().out
