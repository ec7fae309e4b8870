"""`tinygpt summary`: the seed's parameter table, and bad options as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import variant_model_cases

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.cli import main, options
from tinygpt.model import parameter_table, planned_parameter_table

SEED_TABLE = """\
module              parameters
positional               1,024
embedding                1,280
blocks.0.attention       4,224
blocks.0.norm1              64
blocks.0.mlp             4,192
blocks.0.norm2              64
blocks.1.attention       4,224
blocks.1.norm1              64
blocks.1.mlp             4,192
blocks.1.norm2              64
lm_head                  1,320
total                   20,712
"""


def test_summary_of_the_seed_prints_the_seeds_table(capsys):
    assert main(["summary", "--config", "seed"]) == 0
    out = capsys.readouterr().out
    config_line, table = out.split("\n", 1)
    assert config_line == f"config seed: {ModelConfig.preset('seed')}"
    assert table == SEED_TABLE


def test_summary_console_script_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "tinygpt", "summary", "--config", "seed"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(SEED_TABLE)


@pytest.mark.parametrize("options", [
    ["--config", "shakespeare-cpu"],
    ["--config", "seed", "--norm-first", "true", "--d-model", "48"],
])
def test_summary_total_is_the_models_parameter_count(capsys, options):
    assert main(["summary", *options]) == 0
    lines = capsys.readouterr().out.splitlines()
    config = ModelConfig.preset(options[1], **(
        {"norm_first": True, "d_model": 48} if len(options) > 2 else {}))
    total = sum(p.numel() for p in TinyDecoderModel(config).parameters())
    assert lines[-1].split() == ["total", f"{total:,}"]
    assert sum(int(line.split()[1].replace(",", "")) for line in lines[2:-1]) == total
    assert ("final_norm" in "".join(lines)) == config.norm_first


@pytest.mark.parametrize("options, message", [
    (["--n-heads", "5"], "d_model (32) must be divisible by n_heads (5)."),
    (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5."),
    (["--activation", "tanh"], "activation must be one of relu, gelu, gelu_tanh, got 'tanh'."),
    (["--vocab-size", "0"], "vocab_size must be a positive integer, got 0."),
])
def test_summary_bad_config_is_one_line_with_exit_code_2(capsys, options, message):
    assert main(["summary", "--config", "seed", *options]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"tinygpt: error: {message}\n"
    assert captured.out == ""


def test_summary_bad_config_in_a_fresh_process_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "tinygpt", "summary", "--config", "seed",
                             "--n-heads", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "tinygpt: error: d_model (32) must be divisible by n_heads (3).\n"


def test_summary_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["summary", "--config", "huge"])
    assert exit_.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


@given(variant_model_cases(grouped=True), st.booleans(), st.booleans(), st.booleans())
def test_the_table_counted_from_a_config_equals_the_table_of_the_built_model(
        case, attn_only, tie_embeddings, head_bias):
    """Every field that changes a parameter's shape, drawn: positions of every kind, grouped KV
    heads, both norm placements, no MLP, a tied head, a head without bias."""
    config = replace(case.config, attn_only=attn_only, tie_embeddings=tie_embeddings,
                     head_bias=head_bias)
    model = TinyDecoderModel(config)
    assert planned_parameter_table(config) == parameter_table(model)
    assert sum(n for _, n in planned_parameter_table(config)) == sum(
        p.numel() for p in model.parameters())


def test_counting_a_config_leaves_the_compiler_stack_unimported():
    """The memory check every command makes before building a model costs no import: torch 2.13
    imports torch._dynamo (70 MB resident) when initialisers run on the meta device."""
    code = ("import sys; from tinygpt.cli.options import check_model_fits; "
            "from tinygpt.config import ModelConfig; "
            "check_model_fits(ModelConfig.preset('gpt2'), training=True, force=False); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


def test_summary_counts_a_model_far_larger_than_memory_without_building_it(capsys):
    """80 billion parameters (298 GiB of float32): building it would fail in the allocator."""
    assert main(["summary", "--config", "seed", "--d-model", "100000"]) == 0
    assert capsys.readouterr().out.endswith("total               80,038,600,168\n")


def test_a_model_larger_than_the_memory_available_is_refused_unless_forced():
    config = ModelConfig.preset("seed")  # 20,712 parameters
    with pytest.raises(ValueError, match=r"^a model of 20,712 parameters needs 0\.32 MiB to "
                                         r"train \(weights, gradients, AdamW moments\), more "
                                         r"than the 0\.32 MiB of memory available; choose a "
                                         r"smaller config or pass --force\.$"):
        options.check_model_fits(config, training=True, force=False, available=20_712 * 16 - 1)
    options.check_model_fits(config, training=True, force=False, available=20_712 * 16)
    options.check_model_fits(config, training=False, force=False, available=20_712 * 4)
    with pytest.raises(ValueError, match="for its weights"):
        options.check_model_fits(config, training=False, force=False, available=20_712 * 4 - 1)
    options.check_model_fits(config, training=True, force=True, available=0)
    assert options.available_memory() > 0
