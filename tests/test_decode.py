"""The compiled decode step (`tinygpt.generate.compiled`, `generate(compile=...)`) is the same
function as recomputation: logits and tokens at every step, across slides, ragged rows and beams.

Most tests compile with `counting_backend`: torch's "aot_eager" backend (Dynamo's trace plus AOT
functionalisation of the in-place cache writes, as inductor gets them, but no code generation, so
about a second per graph) wrapped to count how often the compiled graph runs. A silent fallback to
eager would leave the count at 0 and fail. Inductor itself (a C++ build of several seconds) is
tested once, marked slow.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from gen_strategies import TOLERANCE, build_model, random_prompt

from tinygpt import ModelConfig, TinyDecoderModel
from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import main
from tinygpt.generate import beam_search, generate, generate_steps
from tinygpt.generate.compiled import decode_step
from tinygpt.generate.decoder import Decoder
from tinygpt.tokenizer import CharTokenizer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from empty compile caches, far from torch's limit of 8 graphs per step."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class CountingBackend:
    """A torch.compile backend: aot_eager, counting the graphs built and the runs of them."""

    def __init__(self):
        self.graphs, self.runs = 0, 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        compiled = torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


def run_steps(model, prompt, n, **options):
    """Every step of `generate_steps`, seeded, and how many of them were eager (re-)prefills.

    The prefills are counted at the decoder, not at the model's forward: the compiled step runs
    that same forward inside its graph.
    """
    generator = torch.Generator().manual_seed(0)
    with mock.patch.object(Decoder, "_prefill", autospec=True,
                           side_effect=Decoder._prefill) as prefill:
        steps = list(generate_steps(model, prompt, n, generator=generator, **options))
    return steps, prefill.call_count


CASES = [
    # the seed's post-norm, ReLU and input scale; fp64; two rows
    (ModelConfig.preset("seed", vocab_size=12, max_seq=8), torch.float64, "fast", 2),
    # pre-norm, GELU, three heads of width 5; fp32
    (ModelConfig(vocab_size=10, d_model=15, n_heads=3, n_layers=3, d_ff=20, max_seq=7,
                 norm_first=True, activation="gelu"), torch.float32, "fast", 1),
    (ModelConfig.preset("seed", vocab_size=12, max_seq=5), torch.float64, "exact", 1),
]


@pytest.mark.parametrize("config, dtype, policy, rows", CASES)
def test_compiled_generation_equals_recomputation(config, dtype, policy, rows):
    """The compiled step: same logits (fp32 1e-5, fp64 1e-10) and the same
    sampled tokens as the uncached path, over 3 x max_seq + 2 tokens, so the context slides."""
    model = build_model(config, seed=1, dtype=dtype, spread=2.0 if dtype == torch.float64 else 1.0)
    prompt = torch.stack([random_prompt(3, config.vocab_size, seed=r) for r in range(rows)])
    n = 3 * config.max_seq + 2
    backend = CountingBackend()
    compiled, prefills = run_steps(model, prompt, n, policy=policy, compile=backend)
    recomputed, _ = run_steps(model, prompt, n, policy=policy, use_cache=False)
    for k, (a, b) in enumerate(zip(compiled, recomputed, strict=True)):
        assert torch.equal(a.tokens, b.tokens), f"token {k} differs"
        torch.testing.assert_close(a.logits, b.logits, **TOLERANCE[dtype], msg=f"step {k}")
    # Every step that is not an eager (re-)prefill ran the compiled graph, built once.
    assert backend.graphs == 1 and backend.runs == n - prefills
    assert backend.runs >= (n // 2 if policy == "fast" else config.max_seq - 3)


def test_compiled_ragged_batch_equals_recomputation():
    """Left padding: each row's pads stay hidden and each row keeps its own positions."""
    config = ModelConfig.preset("seed", vocab_size=12, max_seq=8)
    model = build_model(config, seed=2, spread=2.0)
    prompts = [random_prompt(n, config.vocab_size, seed=n) for n in (1, 11, 5)]
    n = 2 * config.max_seq + 1
    backend = CountingBackend()
    for policy in ("fast", "exact"):
        compiled, _ = run_steps(model, prompts, n, do_sample=False, policy=policy,
                                compile=backend)
        recomputed, _ = run_steps(model, prompts, n, do_sample=False, policy=policy,
                                  use_cache=False)
        for k, (a, b) in enumerate(zip(compiled, recomputed, strict=True)):
            assert torch.equal(a.tokens, b.tokens), f"{policy}: token {k} differs"
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-10)
    assert backend.runs > 0


def test_compiled_beam_search_equals_eager_beam_search():
    """Beam search reorders the rows of the fixed buffers at every step."""
    config = ModelConfig.preset("seed", vocab_size=12, max_seq=6)
    model = build_model(config, seed=3, spread=2.0)
    prompt = random_prompt(2, config.vocab_size, seed=3)[None]
    backend = CountingBackend()
    compiled = beam_search(model, prompt, 15, beam_width=3, policy="fast", compile=backend)
    eager = beam_search(model, prompt, 15, beam_width=3, policy="fast")
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert a.log_prob == pytest.approx(b.log_prob, rel=1e-10, abs=1e-10)
    assert backend.runs > 0


def test_decode_step_hides_the_columns_not_written_yet():
    """The buffers' unwritten columns may hold anything finite: the step's mask hides them. The
    same step told that those columns are written gives other logits, so the check has teeth."""
    config = ModelConfig.preset("seed", vocab_size=12, max_seq=8)
    model = build_model(config, seed=4, spread=2.0)
    idx = random_prompt(5, config.vocab_size, seed=4)[None]
    cache = model.new_cache()
    generator = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        model(idx[:, :4], cache=cache)
        expected = model(idx[:, 4:], cache=cache)[:, -1]
        keys, values = [], []
        for layer in cache:
            for written, buffers in ((layer.k, keys), (layer.v, values)):
                noise = torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64) * 10
                noise[:, :, :4] = written[:, :, :4]
                buffers.append(noise)
        is_pad = torch.zeros(1, 8, dtype=torch.bool)
        step = decode_step(model, idx[:, 4:], torch.tensor([[4]]), torch.tensor([4]), is_pad,
                           keys, values)
        torch.testing.assert_close(step, expected, rtol=1e-10, atol=1e-10)
        assert all(torch.equal(k[:, :, :5], layer.k) for k, layer in zip(keys, cache))
        unmasked = decode_step(model, idx[:, 4:], torch.tensor([[4]]), torch.tensor([7]), is_pad,
                               keys, values)
    assert not torch.allclose(unmasked, expected, rtol=1e-3, atol=1e-3)


def test_decode_step_is_the_models_own_forward():
    """The step keeps no copy of the forward: a change to `TinyDecoderModel.forward` (here, logits
    doubled) reaches the step's logits."""
    config = ModelConfig.preset("seed", vocab_size=12, max_seq=8)
    model = build_model(config, seed=6, spread=2.0)
    idx = random_prompt(3, config.vocab_size, seed=6)[None]
    cache = model.new_cache()
    with torch.inference_mode():
        model(idx[:, :2], cache=cache)

        def step():
            keys = [F.pad(layer.k, (0, 0, 0, 6)) for layer in cache]  # b h 8 d, 2 columns written
            values = [F.pad(layer.v, (0, 0, 0, 6)) for layer in cache]
            return decode_step(model, idx[:, 2:], torch.tensor([[2]]), torch.tensor([2]),
                               torch.zeros(1, 8, dtype=torch.bool), keys, values)

        plain = step()
        forward = TinyDecoderModel.forward
        with mock.patch.object(TinyDecoderModel, "forward", autospec=True,
                               side_effect=lambda *args, **kwargs: 2 * forward(*args, **kwargs)):
            doubled = step()
    torch.testing.assert_close(doubled, 2 * plain, rtol=0, atol=0)
    assert not torch.allclose(plain, doubled)


@pytest.mark.slow
def test_inductor_step_equals_recomputation():
    """`compile=True` itself: inductor's generated code gives the uncached logits and tokens."""
    config = ModelConfig.preset("seed", vocab_size=12, max_seq=8)
    model = build_model(config, seed=5, dtype=torch.float32)
    prompt = random_prompt(3, config.vocab_size, seed=5)[None]
    n = 3 * config.max_seq + 2
    compiled, prefills = run_steps(model, prompt, n, policy="fast", compile=True)
    recomputed, _ = run_steps(model, prompt, n, policy="fast", use_cache=False)
    for k, (a, b) in enumerate(zip(compiled, recomputed, strict=True)):
        assert torch.equal(a.tokens, b.tokens), f"token {k} differs"
        torch.testing.assert_close(a.logits, b.logits, **TOLERANCE[torch.float32])
    assert prefills < n // 2  # most steps were compiled ones
    # The weights are inputs of the graph, not constants baked into it: a change is seen.
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    changed, _ = run_steps(model, prompt, 4, policy="fast", compile=True)
    recomputed, _ = run_steps(model, prompt, 4, policy="fast", use_cache=False)
    for a, b in zip(changed, recomputed, strict=True):
        torch.testing.assert_close(a.logits, b.logits, **TOLERANCE[torch.float32])


def test_compile_needs_the_cache_and_a_backend():
    model = build_model(ModelConfig.preset("seed", max_seq=4), seed=0)
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="compile=True speeds up the cached decode step"):
        generate(model, prompt, 2, compile=True, use_cache=False)
    for bad in ("", 3):
        with pytest.raises(ValueError, match="compile must be True, False or a torch.compile"):
            generate(model, prompt, 2, compile=bad)
    with pytest.raises(ValueError, match="it needs use_cache=True"):
        beam_search(model, prompt, 2, beam_width=2, compile=True, use_cache=False)


def test_cli_compile_draws_the_same_text_and_rejects_no_cache(tmp_path, capsys):
    tokenizer = CharTokenizer.from_text("ROMEO:\nabc de")
    config = ModelConfig.preset("seed", vocab_size=tokenizer.vocab_size, max_seq=8)
    save_checkpoint(tmp_path / "tiny", model=build_model(config, 0, torch.float32, spread=2.0),
                    tokenizer=tokenizer, step=1)
    args = ["generate", "--checkpoint", str(tmp_path / "tiny"), "--prompt", "RO",
            "--max-new-tokens", "30", "--seed", "1", "--policy", "fast"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile", "aot_eager"]) == 0
    assert capsys.readouterr().out == eager
    assert main([*args, "--compile", "--no-cache"]) == 2
    _, err = capsys.readouterr()
    assert err == "tinygpt: error: --compile speeds up the cached decode step; it cannot be " \
                  "used with --no-cache.\n"
