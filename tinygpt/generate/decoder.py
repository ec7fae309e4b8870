"""Autoregressive decoding from a TinyDecoderModel: the loop, each row's context, ragged prompts.

The full history is kept and returned; the model sees a *context* of at most `max_seq` recent
tokens. Positions are learned and absolute, so when the context slides every cached key sits at the
wrong position: the key/value cache is then rebuilt from the new context (a *re-prefill*). Which
tokens form the context is the *slide policy*:

- `"exact"`: always the last `max_seq` tokens (the seed's sliding window). Once the window is full
  every step re-prefills, so the result equals recomputing the window at every step, and the cache
  only saves work on the first `max_seq` tokens.
- `"fast"`: when the context would grow past `max_seq` tokens it is cut to its newest
  `max_seq // 2` (at least 1) and re-prefilled once; the following tokens each cost one position
  again. The model then sees between `max_seq // 2` and `max_seq` tokens of history.
- `"rolling"`, for models with relative positions (`position` alibi, rope or none): once the
  cache holds `max_seq` keys the oldest key and value of every layer are dropped as each new one
  comes in, with no re-prefill. Positions keep counting up (RoPE turns by relative offsets, ALiBi
  penalises distances), so every step equals a pass over the whole history with a sliding window
  of `max_seq` keys in every layer (each cached key was itself computed from its own window).
  It needs the eager cache (`use_cache=True`, no `compile`): recomputing a context from scratch
  would give each key less history than the cache's key had.

`use_cache=False` recomputes the policy's context from scratch at every step: that is the
definition the cached path is tested against, logits and tokens alike. `compile=True` runs the
one-token cached step under `torch.compile` with a fixed-shape cache (`tinygpt.generate.cache`):
same results, less per-step overhead, after a one-off compile of several seconds.

Rows of different lengths are padded on the left, their pads hidden by a key-padding mask, and each
row gets its own positions and its own context, so every row equals generating that prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.config import is_int_at_least
from tinygpt.generate.cache import Backend, DecodingCache, choose_cache
from tinygpt.generate.sampling import Sampling, resolve_sampling
from tinygpt.generate.text import TextTail, check_stop
from tinygpt.model import TinyDecoderModel

POLICIES = ("exact", "fast", "rolling")

Prompts = Tensor | Sequence[Tensor | Sequence[int]]


class Decoder:
    """The token histories of a batch of rows, each row's context, and the cache of that context.

    Histories are padded on the left to a common width. `context[r]` is how many of row r's newest
    tokens the model sees; the cache holds exactly those, padded on the left to the longest
    context. Each step is a `prefill` of the whole context when it is new (at the start, or after
    a slide) and a `decode_one_token` otherwise.
    """

    def __init__(self, model: TinyDecoderModel, prompts: list[Tensor], policy: str,
                 cache: DecodingCache):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}.")
        if policy == "rolling" and model.config.position == "learned":
            raise ValueError("the rolling policy needs relative positions (alibi, rope or none): "
                             "a learned table has no row past max_seq.")
        self.cache, self.prompts, self.rolling = cache, prompts, policy == "rolling"
        self.max_seq = model.config.max_seq
        self.keep = self.max_seq if policy == "exact" else max(1, self.max_seq // 2)
        self.device = model.embedding.weight.device  # every model has one; not every a table
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        self.idx = torch.stack([F.pad(p, (width - len(p), 0)) for p in prompts]).to(self.device)
        self.n_pad = width - lengths  # b
        self.context = lengths.clamp(max=self.max_seq)  # b
        self.new = None  # b 1: the tokens appended since the last step, None before a prefill

    def next_logits(self) -> Tensor:
        """Logits `(b v)` for each row's next token."""
        if self.new is None:
            return self._prefill()
        if self.rolling:
            self.cache.roll(self.max_seq - 1)  # room for the new key
        return self.cache.decode_one_token(self.new, (self.context - 1)[:, None])

    def _prefill(self) -> Tensor:
        width = int(self.context.max())
        start = width - self.context  # b: first real column of each row's context
        columns = torch.arange(width, device=self.device)
        is_pad = columns < start[:, None]  # b j
        if not is_pad.any():
            return self.cache.prefill(self.idx[:, -width:], None, None)
        positions = (columns - start[:, None]).clamp(min=0)  # b t
        return self.cache.prefill(self.idx[:, -width:], positions, is_pad)

    def append(self, tokens: Tensor) -> None:
        """Add one token `(b)` to every row, sliding the contexts that outgrow `max_seq`."""
        self.new = tokens.to(self.device)[:, None]
        self.idx = torch.cat([self.idx, self.new], dim=1)
        self.context = self.context + 1
        outgrown = self.context > self.max_seq
        if outgrown.any() and not self.rolling:  # rolling: the cache drops its oldest key instead
            self.context = self.context.masked_fill(outgrown, self.keep)
            self.new = None  # the positions of every cached key are now stale: prefill again

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `(b')` of the batch, in that order (repeats allowed): beam search's step."""
        rows = rows.to(self.device)
        self.idx, self.n_pad, self.context = self.idx[rows], self.n_pad[rows], self.context[rows]
        self.cache.reorder(rows)

    def sequences(self) -> list[Tensor]:
        """Each row's history `(t)` on the CPU, without its padding."""
        return [row[int(n):].cpu() for row, n in zip(self.idx, self.n_pad)]


def as_prompts(idx: Prompts, model: TinyDecoderModel) -> list[Tensor]:
    """One 1-D long tensor per prompt, each checked against the vocabulary, kept on the CPU."""
    if isinstance(idx, Tensor):
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}.")
        rows = list(idx)
    else:
        rows = [torch.as_tensor(row) for row in idx]
    if not rows:
        raise ValueError("no prompts given.")
    prompts = []
    for n, row in enumerate(rows):
        if row.ndim == 1 and len(row) == 0:
            raise ValueError(f"prompt {n} is empty; give at least one token (e.g. a newline).")
        if row.ndim != 1 or row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
            raise ValueError(f"prompt {n} must be a 1-D sequence of integer token ids.")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= model.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} in prompt {n} is outside the vocabulary "
                f"0..{model.config.vocab_size - 1}."
            )
        prompts.append(row.to("cpu", torch.long))
    return prompts


def check_count(max_new_tokens: int) -> None:
    if not is_int_at_least(max_new_tokens, 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")


def start_decoding(model: TinyDecoderModel, idx: Prompts, max_new_tokens: int, *,
                   use_cache: bool = True, policy: str = "exact",
                   compile: bool | Backend = False) -> Decoder:
    """A `Decoder` over checked prompts, its cache kind chosen once; every argument checked."""
    check_count(max_new_tokens)
    if policy == "rolling" and (not use_cache or compile is not False):
        raise ValueError("the rolling policy needs the eager cache: use_cache=True, no compile.")
    prompts = as_prompts(idx, model)
    return Decoder(model, prompts, policy, choose_cache(model, use_cache, compile))


@dataclass(frozen=True)
class Step:
    """One decoding step: the chosen tokens `(b)` and the logits `(b v)` they were drawn from."""

    tokens: Tensor
    logits: Tensor


@torch.inference_mode()
def decode_loop(decoder: Decoder, sampling: Sampling, max_new_tokens: int,
           generator: torch.Generator | None = None) -> Iterator[Step]:
    """The decoding loop: the logits of every row's next token, a draw, and the token appended."""
    for _ in range(max_new_tokens):
        logits = decoder.next_logits()
        tokens = sampling.sample(logits, generator)
        decoder.append(tokens)
        yield Step(tokens, logits)


@torch.inference_mode()
def generate_steps(model: TinyDecoderModel, idx: Prompts, max_new_tokens: int, *,
                   sampling: Sampling | None = None, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, do_sample: bool = True,
                   use_cache: bool = True, generator: torch.Generator | None = None,
                   policy: str = "exact", compile: bool | Backend = False) -> Iterator[Step]:
    """Yield each step of `generate` as it happens: what streaming and the tests are built on.

    The arguments are `generate`'s; they are checked when the first step is asked for.
    """
    sampling = resolve_sampling(sampling, temperature, top_k, top_p, do_sample)
    decoder = start_decoding(model, idx, max_new_tokens, use_cache=use_cache, policy=policy,
                             compile=compile)
    yield from decode_loop(decoder, sampling, max_new_tokens, generator)


def generate(model: TinyDecoderModel, idx: Prompts, max_new_tokens: int, *,
             sampling: Sampling | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, do_sample: bool = True,
             use_cache: bool = True, generator: torch.Generator | None = None,
             policy: str = "exact", stop: Sequence[str] | None = None,
             decode: Callable[[list[int]], str] | None = None,
             compile: bool | Backend = False) -> Tensor | list[Tensor]:
    """Extend every prompt by up to `max_new_tokens` tokens; see the module doc for the context.

    idx is a tensor `(b t)` -> a tensor `(b t+new)`, or a list of prompts of any lengths -> a list
    of 1-D tensors, each row equal to generating that prompt alone. The model should be in eval
    mode. Sampling: a `Sampling`, or its options as keywords (not both): `temperature` divides the
    logits, then `top_k` and `top_p` filter them, `do_sample=False` is greedy; `generator` makes
    draws reproducible. `stop` strings (with `decode`, e.g. a tokenizer's) end a row at the token
    that completes one of them in the row's new text; a tensor of several rows cannot hold rows
    that end apart, so pass those prompts as a list.
    `compile=True` (or a `torch.compile` backend, named or callable) runs each cached step compiled
    (`tinygpt.generate.compiled`): the same tokens and logits, faster once the one-off compile is
    paid. Hooks added to the model after the first compiled call may not fire in compiled steps.

    Raises:
        ValueError: naming the first bad argument or prompt token.
    """
    sampling = resolve_sampling(sampling, temperature, top_k, top_p, do_sample)
    if stop is not None:
        if decode is None:
            raise ValueError("stop strings need decode= (for example tokenizer.decode).")
        if isinstance(idx, Tensor) and idx.ndim == 2 and idx.shape[0] > 1:
            raise ValueError(
                "stop strings end rows at different lengths: pass the prompts as a list."
            )
        check_stop(stop)
    decoder = start_decoding(model, idx, max_new_tokens, use_cache=use_cache, policy=policy,
                             compile=compile)
    rows: list[list[int]] = [[] for _ in decoder.prompts]
    # A tokenizer's bound `decode` brings its byte decoding along (see TextTail).
    decode_bytes = getattr(getattr(decode, "__self__", None), "decode_bytes", None)
    tails = [TextTail(decode, stop, decode_bytes) for _ in rows] if stop is not None else None
    ended = [False] * len(rows)
    for step in decode_loop(decoder, sampling, max_new_tokens, generator):
        for r, token in enumerate(step.tokens.tolist()):
            if not ended[r]:
                rows[r].append(token)
                if tails is not None:
                    tails[r].push(token)  # decodes only the row's newest tokens
                    ended[r] = tails[r].stopped
        if all(ended):
            break
    out = [torch.cat([p, torch.tensor(new, dtype=torch.long)])
           for p, new in zip(decoder.prompts, rows)]
    if isinstance(idx, Tensor):
        return torch.stack(out).to(idx.device)
    return out
