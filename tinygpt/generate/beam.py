"""Beam search: the most likely continuations of one prompt, ranked by summed log-probability."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tinygpt.config import is_int_at_least
from tinygpt.generate.cache import Backend
from tinygpt.generate.decoder import Decoder, Prompts, start_decoding
from tinygpt.generate.sampling import NAN_LOGITS
from tinygpt.model import TinyDecoderModel


@dataclass(frozen=True)
class Beam:
    """One finished hypothesis of `beam_search`."""

    tokens: Tensor  # t: the prompt and its continuation
    log_prob: float  # the summed log-probabilities of the new tokens
    score: float  # what beams are ranked by: log_prob / n_new ** length_penalty


def _check_beam(model: TinyDecoderModel, beam_width: int, length_penalty: float,
                eos_id: int | None) -> None:
    if not is_int_at_least(beam_width, 1):
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}.")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}.")
    vocab = model.config.vocab_size
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary 0..{vocab - 1}.")


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

    Raises:
        ValueError: naming the first bad argument or prompt token, or when the logits are NaN.
    """
    _check_beam(model, beam_width, length_penalty, eos_id)
    decoder = start_decoding(model, idx, max_new_tokens, use_cache=use_cache, policy=policy,
                             compile=compile)
    if len(decoder.prompts) != 1:
        raise ValueError(f"beam search takes one prompt, got {len(decoder.prompts)}.")
    return _search(decoder, model.config.vocab_size, max_new_tokens, beam_width,
                   length_penalty, eos_id)


def _search(decoder: Decoder, vocab: int, max_new_tokens: int, beam_width: int,
            length_penalty: float, eos_id: int | None) -> list[Beam]:
    prompt_length = len(decoder.prompts[0])

    def finish(tokens: Tensor, log_prob: float) -> Beam:
        n_new = len(tokens) - prompt_length
        return Beam(tokens, log_prob, log_prob / max(n_new, 1) ** length_penalty)

    log_probs = torch.zeros(1, dtype=torch.float64)  # b: summed log-probs of the live beams
    finished: list[Beam] = []
    for _ in range(max_new_tokens):
        step = decoder.next_logits().double().log_softmax(dim=-1).cpu()  # b v
        if step.isnan().any():
            raise ValueError(NAN_LOGITS)
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
