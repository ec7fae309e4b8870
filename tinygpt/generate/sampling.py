"""How the next token is drawn from the logits: filters over logits, composed, and one `Sampling`.

A filter is a plain function from logits `(... v)` to logits `(... v)`; a token it removes gets
-inf. `Sampling` holds the options, is checked once when it is made, and lists its filters
then, so a decoding loop draws every token without looking at the options again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, reduce

import torch
from torch import Tensor

from tinygpt.config import is_int_at_least

LogitsFilter = Callable[[Tensor], Tensor]
NAN_LOGITS = ("the model's logits are NaN, so no next token can be chosen; its weights are "
              "probably broken (a training run that diverged).")


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


def temperature_filter(logits: Tensor, temperature: float) -> Tensor:
    """Logits `(... v)` divided by the temperature: below 1 sharpens the distribution."""
    return logits / temperature


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError naming the first bad sampling argument."""
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if top_k is not None and not is_int_at_least(top_k, 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")


@dataclass(frozen=True)
class Sampling:
    """Temperature, then top-k, then top-p, then a draw; `greedy` (or temperature 0) takes the
    most likely token instead (the first on a tie).

    Checked once, when made: a bad option is a ValueError naming it, and decoding never checks
    again per token.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    _filters: tuple[LogitsFilter, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be True or False, got {self.greedy!r}.")
        filters = [partial(temperature_filter, temperature=self.temperature)]
        if self.top_k is not None:
            filters.append(partial(top_k_filter, k=self.top_k))
        if self.top_p is not None:
            filters.append(partial(top_p_filter, p=self.top_p))
        object.__setattr__(self, "_filters", tuple(filters))  # frozen: set once, here

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Next token ids `(b)` from logits `(b v)`.

        Raises:
            ValueError: when a row's logits hold NaN (no token can be chosen from them).
        """
        if self.is_greedy:
            tokens = logits.argmax(dim=-1)  # argmax ranks NaN above every number
            # One flag read per step; every caller reads the chosen tokens on the host anyway.
            if logits.gather(-1, tokens[:, None]).isnan().any():
                raise ValueError(NAN_LOGITS)
            return tokens
        filtered = reduce(lambda out, keep: keep(out), self._filters, logits)  # in order
        probs = filtered.softmax(dim=-1)
        try:
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        except RuntimeError as error:  # torch's text: "probability tensor contains ... nan"
            raise ValueError(self._why_no_token(logits)) from error

    def _why_no_token(self, logits: Tensor) -> str:
        """Why no token could be drawn: the model's own logits, or finite logits that a tiny
        temperature divided past the largest float (read only once the draw has failed)."""
        if bool(torch.isfinite(logits).all()):
            return (f"temperature {self.temperature!r} is so small that the logits divided by it "
                    f"overflow to infinity; use 0 for greedy decoding, or a larger temperature.")
        return NAN_LOGITS


def resolve_sampling(sampling: Sampling | None, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     do_sample: bool = True) -> Sampling:
    """`sampling` itself, or one made from the keywords; giving both is an error.

    The public functions take either a `Sampling` or the keywords they have always taken; the
    keywords are then checked here, once.
    """
    if sampling is None:
        return Sampling(temperature, top_k, top_p, greedy=not do_sample)
    if (temperature, top_k, top_p, do_sample) != (1.0, None, None, True):
        raise ValueError("give the sampling options either as sampling= or as keywords, not both.")
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling, got {type(sampling).__name__}.")
    return sampling


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, do_sample: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids `(b)` from logits `(b v)`: `Sampling(...).sample`, for one draw.

    Temperature 0 or `do_sample=False` is greedy: the most likely token (the first on a tie).
    """
    return Sampling(temperature, top_k, top_p, greedy=not do_sample).sample(logits, generator)
