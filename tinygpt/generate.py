"""Autoregressive decoding from a TinyDecoderModel: sampling, beam search and streamed text.

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

`use_cache=False` recomputes the policy's context from scratch at every step: that is the
definition the cached path is tested against, logits and tokens alike. `compile=True` runs the
one-token cached step under `torch.compile` with a fixed-shape cache (see `tinygpt.decode`): same
results, less per-step overhead, after a one-off compile of several seconds.

Rows of different lengths are padded on the left, their pads hidden by a key-padding mask, and each
row gets its own positions and its own context, so every row equals generating that prompt alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.decode import StaticCache
from tinygpt.model import TinyDecoderModel

POLICIES = ("exact", "fast")

Prompts = Tensor | Sequence[Tensor | Sequence[int]]
Backend = str | Callable  # a torch.compile backend: a name such as "inductor", or a callable


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits `(... v)` with every entry below the k-th largest set to -inf.

    Ties with the k-th largest are all kept, so more than k tokens may survive; `k >= v` changes
    nothing.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Logits `(... v)` keeping the smallest set of most likely tokens whose probability reaches p.

    The most likely token always survives; `p = 1` changes nothing. Tokens tied at the boundary are
    taken in id order (a stable sort), so only as many as needed are kept.
    """
    if p >= 1.0:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to token order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, do_sample: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids `(b)` from logits `(b v)`: temperature, then top-k, then top-p, then a draw.

    Temperature 0 or `do_sample=False` is greedy: the most likely token (the first on a tie).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0 or not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError naming the first bad sampling argument."""
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")


class _Decoder:
    """The token histories of a batch of rows, each row's context, and the cache of that context.

    Histories are padded on the left to a common width. `context[r]` is how many of row r's newest
    tokens the model sees; the cache (when used) holds exactly those, padded on the left to the
    longest context, with `is_pad (b j)` marking the padding. With a compile `backend`, each
    prefill's cache is moved into a `StaticCache`, whose compiled step extends it from then on.
    """

    def __init__(self, model: TinyDecoderModel, prompts: list[Tensor], policy: str,
                 use_cache: bool, backend: str | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}.")
        self.model, self.use_cache, self.backend = model, use_cache, backend
        self.max_seq = model.config.max_seq
        self.keep = self.max_seq if policy == "exact" else max(1, self.max_seq // 2)
        self.device = model.positional.device
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        self.idx = torch.stack([F.pad(p, (width - len(p), 0)) for p in prompts]).to(self.device)
        self.n_pad = width - lengths  # b
        self.context = lengths.clamp(max=self.max_seq)  # b
        self.cache = None  # KVCaches or a StaticCache; None when the next call must (re-)prefill
        self.is_pad = None  # b j, or None when no cached key is padding
        self.new = None  # b 1: tokens appended since the cache was last extended

    def next_logits(self) -> Tensor:
        """Logits `(b v)` for each row's next token."""
        if self.cache is None:
            return self._prefill()
        if isinstance(self.cache, StaticCache):
            return self.cache(self.new, (self.context - 1)[:, None])
        positions = None if self.is_pad is None else (self.context - 1)[:, None]
        if self.is_pad is not None:
            self.is_pad = F.pad(self.is_pad, (0, 1), value=False)
        logits = self.model(self.new, cache=self.cache, positions=positions,
                            key_padding_mask=self.is_pad)
        return logits[:, -1]

    def _prefill(self) -> Tensor:
        width = int(self.context.max())
        start = width - self.context  # b: first real column of each row's context
        columns = torch.arange(width, device=self.device)
        is_pad = columns < start[:, None]  # b j
        padded = bool(is_pad.any())
        self.is_pad = is_pad if padded else None
        positions = (columns - start[:, None]).clamp(min=0) if padded else None
        self.cache = self.model.new_cache() if self.use_cache else None
        logits = self.model(self.idx[:, -width:], cache=self.cache, positions=positions,
                            key_padding_mask=self.is_pad)
        if self.backend is not None and width < self.max_seq:  # a full context slides next step
            self.cache = StaticCache(self.model, self.cache, self.is_pad, self.backend)
        return logits[:, -1]

    def append(self, tokens: Tensor) -> None:
        """Add one token `(b)` to every row, sliding the contexts that outgrow `max_seq`."""
        self.new = tokens.to(self.device)[:, None]
        self.idx = torch.cat([self.idx, self.new], dim=1)
        self.context = self.context + 1
        outgrown = self.context > self.max_seq
        if outgrown.any():
            self.context = self.context.masked_fill(outgrown, self.keep)
            self.cache = None  # the positions of every cached key are now stale

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `(b')` of the batch, in that order (repeats allowed): beam search's step."""
        rows = rows.to(self.device)
        self.idx, self.n_pad, self.context = self.idx[rows], self.n_pad[rows], self.context[rows]
        if self.is_pad is not None:
            self.is_pad = self.is_pad[rows]
        if isinstance(self.cache, StaticCache):
            self.cache.reorder(rows)
            return
        for layer in self.cache or []:
            layer.k, layer.v = layer.k[rows], layer.v[rows]

    def sequences(self) -> list[Tensor]:
        """Each row's history `(t)` on the CPU, without its padding."""
        return [row[int(n):].cpu() for row, n in zip(self.idx, self.n_pad)]


def _as_prompts(idx: Prompts, model: TinyDecoderModel) -> list[Tensor]:
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


def _backend(compile: bool | Backend, use_cache: bool) -> Backend | None:
    """The torch.compile backend of the decode step (None: eager), from `compile=`."""
    if compile is False:
        return None
    if not use_cache:
        raise ValueError("compile=True speeds up the cached decode step: it needs use_cache=True.")
    if compile is True:
        return "inductor"
    if not (callable(compile) or isinstance(compile, str) and compile):
        raise ValueError(
            f"compile must be True, False or a torch.compile backend, got {compile!r}."
        )
    return compile


def _check_count(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
        max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")


@dataclass(frozen=True)
class Step:
    """One decoding step: the chosen tokens `(b)` and the logits `(b v)` they were drawn from."""

    tokens: Tensor
    logits: Tensor


@torch.inference_mode()
def generate_steps(model: TinyDecoderModel, idx: Prompts, max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, do_sample: bool = True, use_cache: bool = True,
                   generator: torch.Generator | None = None, policy: str = "exact",
                   compile: bool | Backend = False) -> Iterator[Step]:
    """Yield each step of `generate` as it happens: what streaming and the tests are built on."""
    check_sampling(temperature, top_k, top_p)
    _check_count(max_new_tokens)
    backend = _backend(compile, use_cache)
    decoder = _Decoder(model, _as_prompts(idx, model), policy, use_cache, backend)
    for _ in range(max_new_tokens):
        logits = decoder.next_logits()
        tokens = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             do_sample=do_sample, generator=generator)
        decoder.append(tokens)
        yield Step(tokens, logits)


def generate(model: TinyDecoderModel, idx: Prompts, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             do_sample: bool = True, use_cache: bool = True,
             generator: torch.Generator | None = None, policy: str = "exact",
             stop: Sequence[str] | None = None,
             decode: Callable[[list[int]], str] | None = None,
             compile: bool | Backend = False) -> Tensor | list[Tensor]:
    """Extend every prompt by up to `max_new_tokens` tokens; see the module doc for the context.

    idx is a tensor `(b t)` -> a tensor `(b t+new)`, or a list of prompts of any lengths -> a list
    of 1-D tensors, each row equal to generating that prompt alone. The model should be in eval
    mode. Sampling: `temperature` divides the logits, then `top_k` and `top_p` filter them (see
    `sample_next`); `generator` makes draws reproducible. `stop` strings (with `decode`, e.g. a
    tokenizer's) end a row at the token that completes one of them in the row's new text; a tensor
    of several rows cannot hold rows that end apart, so pass those prompts as a list.
    `compile=True` (or a `torch.compile` backend, named or callable) runs each cached step compiled
    (`tinygpt.decode`): the same tokens and logits, faster once the one-off compile is paid.
    Hooks added to the model after the first compiled call may not fire in compiled steps.
    """
    if stop is not None:
        if decode is None:
            raise ValueError("stop strings need decode= (for example tokenizer.decode).")
        if isinstance(idx, Tensor) and idx.ndim == 2 and idx.shape[0] > 1:
            raise ValueError(
                "stop strings end rows at different lengths: pass the prompts as a list."
            )
        _check_stop(stop)
    prompts = _as_prompts(idx, model)
    rows: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    steps = generate_steps(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, do_sample=do_sample, use_cache=use_cache,
                           generator=generator, policy=policy, compile=compile)
    for step in steps:
        for r, token in enumerate(step.tokens.tolist()):
            if not ended[r]:
                rows[r].append(token)
                ended[r] = stop is not None and find_stop(decode(rows[r]), stop) is not None
        if all(ended):
            break
    out = [torch.cat([p, torch.tensor(new, dtype=torch.long)]) for p, new in zip(prompts, rows)]
    if isinstance(idx, Tensor):
        return torch.stack(out).to(idx.device)
    return out


def _check_stop(stop: Sequence[str]) -> None:
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}.")


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string starts, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt; an empty prompt starts from a newline.

    A tokenizer that cannot encode a character (a strict one) raises a ValueError naming it.
    """
    text = text or "\n"
    try:
        return tokenizer.encode(text)
    except (KeyError, ValueError) as error:
        raise ValueError(f"cannot encode the prompt: {error}") from error


def unknown_characters(tokenizer, text: str) -> list[str]:
    """Characters of `text` that do not survive an encode/decode round trip (mapped to `<unk>`)."""
    unknown = []
    for char in sorted(set(text)):
        try:
            survives = tokenizer.decode(tokenizer.encode(char)) == char
        except (KeyError, ValueError):
            survives = False
        if not survives:
            unknown.append(char)
    return unknown


def stream(model: TinyDecoderModel, tokenizer, prompt: str, max_new_tokens: int, *,
           stop: Sequence[str] = (), **sampling) -> Iterator[str]:
    """Yield the continuation of a text prompt piece by piece, as the tokens are drawn.

    The text is cut just before the first `stop` string, which is not yielded; text that could
    still become a stop string, or an incomplete multi-byte character, is held back until it is
    settled. `sampling` takes `generate`'s keywords.
    """
    _check_stop(stop)
    ids = encode_prompt(tokenizer, prompt)
    new: list[int] = []
    sent = 0  # characters of the decoded continuation already yielded
    for step in generate_steps(model, torch.tensor([ids]), max_new_tokens, **sampling):
        new.append(int(step.tokens[0]))
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is still incomplete
        end = find_stop(text, stop)
        if end is not None:
            if end > sent:
                yield text[sent:end]
            return
        settled = len(text) - _held_back(text, stop)
        if settled > sent:
            yield text[sent:settled]
            sent = settled
    text = tokenizer.decode(new)
    if len(text) > sent:
        yield text[sent:]


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def complete(model: TinyDecoderModel, tokenizer, prompt: str, max_new_tokens: int, *,
             stop: Sequence[str] = (), **sampling) -> str:
    """The continuation of a text prompt: `stream`, all at once."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, stop=stop, **sampling))


@dataclass(frozen=True)
class Beam:
    """One finished hypothesis of `beam_search`."""

    tokens: Tensor  # t: the prompt and its continuation
    log_prob: float  # the summed log-probabilities of the new tokens
    score: float  # what beams are ranked by: log_prob / n_new ** length_penalty


@torch.inference_mode()
def beam_search(model: TinyDecoderModel, idx: Prompts, max_new_tokens: int, *, beam_width: int,
                length_penalty: float = 0.0, eos_id: int | None = None, use_cache: bool = True,
                policy: str = "exact", compile: bool | Backend = False) -> list[Beam]:
    """The `beam_width` best continuations of one prompt, best first.

    Each step extends every live beam by every token and keeps the `beam_width` largest summed
    log-probabilities. A beam that emits `eos_id` is finished; with `eos_id` the beams can end at
    different lengths, and `length_penalty` > 0 favours longer ones (score = log_prob /
    n_new ** length_penalty, as in GNMT without its constant). Contexts follow `policy`;
    `compile` is `generate`'s.
    """
    _check_count(max_new_tokens)
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}.")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}.")
    vocab = model.config.vocab_size
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary 0..{vocab - 1}.")
    prompts = _as_prompts(idx, model)
    if len(prompts) != 1:
        raise ValueError(f"beam search takes one prompt, got {len(prompts)}.")

    def finish(tokens: Tensor, log_prob: float) -> Beam:
        n_new = len(tokens) - len(prompts[0])
        return Beam(tokens, log_prob, log_prob / max(n_new, 1) ** length_penalty)

    decoder = _Decoder(model, prompts, policy, use_cache, _backend(compile, use_cache))
    log_probs = torch.zeros(1, dtype=torch.float64)  # b: summed log-probs of the live beams
    finished: list[Beam] = []
    for _ in range(max_new_tokens):
        step = decoder.next_logits().double().log_softmax(dim=-1).cpu()  # b v
        total = (log_probs[:, None] + step).flatten()  # (b v)
        wanted = beam_width if eos_id is None else 2 * beam_width  # room for beams that end
        best, flat = total.sort(descending=True, stable=True)  # ties: lower id first, as argmax
        best, flat = best[:wanted], flat[:wanted]
        parents, tokens = flat // vocab, flat % vocab
        if eos_id is not None:
            histories = decoder.sequences()
            for parent, log_prob in zip(parents[tokens == eos_id], best[tokens == eos_id]):
                ended = torch.cat([histories[parent], torch.tensor([eos_id])])
                finished.append(finish(ended, float(log_prob)))
            live = (tokens != eos_id).nonzero().flatten()[:beam_width]
            parents, tokens, best = parents[live], tokens[live], best[live]
        if len(parents) == 0:
            log_probs = log_probs[:0]  # every beam has ended
            break
        decoder.reorder(parents)
        decoder.append(tokens)
        log_probs = best
    finished += [finish(s, float(lp)) for s, lp in zip(decoder.sequences(), log_probs)]
    return sorted(finished, key=lambda beam: beam.score, reverse=True)[:beam_width]
