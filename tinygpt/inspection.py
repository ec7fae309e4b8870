"""Looking inside a TinyDecoderModel: an activation cache, interventions and head statistics.

Every observation point is a `HookPoint` (an identity module) already in the model, named by its
module path, e.g. `blocks.0.attention.hook_pattern`. Hooks are attached only for the duration of
one call and always removed afterwards, so a model with no call in flight is untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from tinygpt.attention import HookPoint
from tinygpt.config import is_int_at_least
from tinygpt.data import windows_at
from tinygpt.induction import induction_pattern_scores, repeated_tokens
from tinygpt.model import TinyDecoderModel, check_token_ids, next_token_loss

# A hook function gets the activation and returns a replacement, or None to leave it as it is.
HookFn = Callable[[Tensor], Tensor | None]

HEAD_KINDS = ("previous-token", "first-token", "self")  # read from the attention on text
INDUCTION = "induction"  # read from the attention on random tokens repeated (tinygpt.induction)


def hook_names(model: nn.Module) -> list[str]:
    """Every observation point of `model`, in the order a forward pass reaches them.

    That is the order of `named_modules()`, because every module declares its hook points in
    forward order (a test checks it against a real forward pass).
    """
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]


_PATTERN_HOOKS = ("hook_scores", "hook_masked_scores", "hook_pattern")


def _is_tiled(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "attention_impl", "dense") == "tiled"


def dense_twin(model: TinyDecoderModel) -> TinyDecoderModel:
    """The same weights with the dense attention, whose every hook point fires: the tiled core
    computes the same function but never forms the pattern, so this is what inspection reads."""
    if not _is_tiled(model):
        return model
    twin = TinyDecoderModel(dataclasses.replace(model.config, attention_impl="dense"))
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.to(next(model.parameters()).device).train(model.training)


def _hook_points(model: nn.Module, names: Iterable[str]) -> dict[str, HookPoint]:
    points = {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}
    chosen = {}
    for name in names:
        if name not in points and name.endswith(_PATTERN_HOOKS) and _is_tiled(model):
            raise ValueError(
                f"{name!r} does not exist: the tiled attention never forms the scores or the "
                f"pattern; build the same weights with attention_impl='dense' to inspect them."
            )
        if name not in points:
            raise ValueError(
                f"unknown hook name {name!r}; names look like {next(iter(points), '?')!r} "
                f"(see tinygpt.inspection.hook_names)."
            )
        chosen[name] = points[name]
    return chosen


def _checked(name: str, fn: HookFn) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        replacement = fn(output)
        if replacement is not None and replacement.shape != output.shape:
            raise ValueError(
                f"replacement for {name} has shape {tuple(replacement.shape)}, "
                f"expected {tuple(output.shape)}."
            )
        return replacement

    return hook


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[nn.Module]:
    """Attach `fns` (hook name -> function) as forward hooks; remove them on exit, even on error."""
    handles = []
    try:
        for name, point in _hook_points(model, fns).items():
            handles.append(point.register_forward_hook(_checked(name, fns[name])))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def run_with_cache(model: TinyDecoderModel, idx: Tensor,
                   names: Iterable[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """idx `(b t)` -> logits `(b t v)` and the requested activations (all of them if `names` is
    None), detached. Only requested names get a hook, so nothing else is kept in memory."""
    names = hook_names(model) if names is None else list(names)
    cache: dict[str, Tensor] = {}

    def keep(name: str) -> HookFn:
        def store(x: Tensor) -> None:
            cache[name] = x.detach()

        return store

    check_token_ids(idx, model.config)
    with hooks(model, {name: keep(name) for name in names}):
        logits = model(idx)
    return logits, cache


def run_with_interventions(model: TinyDecoderModel, idx: Tensor,
                           interventions: Mapping[str, HookFn]) -> Tensor:
    """idx `(b t)` -> logits `(b t v)`, each named activation replaced by its function's result."""
    check_token_ids(idx, model.config)
    with hooks(model, interventions):
        return model(idx)


def zero_heads(*heads: int) -> HookFn:
    """An intervention for a per-head activation (`b h ...`) that zeroes the given heads.

    Heads are counted from 0; a negative or too large index is refused (a ValueError) rather than
    read as counting from the end.
    """
    for head in heads:
        if not is_int_at_least(head, 0):
            raise ValueError(f"a head index must be an integer >= 0, got {head!r}.")

    def zero(x: Tensor) -> Tensor:
        if heads and max(heads) >= x.shape[1]:
            raise ValueError(f"head {max(heads)} is outside 0..{x.shape[1] - 1}.")
        x = x.clone()
        x[:, list(heads)] = 0.0
        return x

    return zero


def replace_with(value: Tensor) -> HookFn:
    """An intervention that substitutes `value` (same shape) for the activation."""
    return lambda x: value.to(dtype=x.dtype, device=x.device)


def _check_head(model: TinyDecoderModel, layer: int, head: int) -> None:
    config = model.config
    if not 0 <= layer < config.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{config.n_layers - 1}.")
    if not 0 <= head < config.n_heads:
        raise ValueError(f"head {head} is outside 0..{config.n_heads - 1}.")


def ablate_head(model: TinyDecoderModel, idx: Tensor, layer: int, head: int) -> Tensor:
    """Logits `(b t v)` with head `head` of layer `layer` zero-ablated: its output `z` is zeroed
    before the heads are merged, so it adds nothing but out_proj's bias to the residual stream."""
    _check_head(model, layer, head)
    z_name = f"blocks.{layer}.attention.hook_z"
    return run_with_interventions(model, idx, {z_name: zero_heads(head)})


@torch.no_grad()
def head_importance(model: TinyDecoderModel, idx: Tensor, targets: Tensor) -> tuple[float, Tensor]:
    """The loss on (idx, targets) `(b t)` and, per head, `(layers, heads)`, how much that loss
    rises when the head alone is zero-ablated. A head the model relies on shows a large rise."""
    base = next_token_loss(model(idx), targets).item()
    rise = torch.zeros(model.config.n_layers, model.config.n_heads)
    for layer in range(model.config.n_layers):
        for head in range(model.config.n_heads):
            ablated = ablate_head(model, idx, layer, head)
            rise[layer, head] = next_token_loss(ablated, targets) - base
    return base, rise


@dataclass(frozen=True)
class HeadScores:
    """How much one head attends, on average over queries from the third on, to the previous token,
    the first token and itself, and its induction score; `kind` is the largest of the four when it
    reaches the threshold."""

    layer: int
    head: int
    previous_token: float
    first_token: float
    self_token: float
    induction: float
    kind: str  # one of HEAD_KINDS, INDUCTION, or "mixed"


def pattern_scores(pattern: Tensor) -> Tensor:
    """pattern `(b h i j)` -> `(h 3)`: mean weight on j = i-1, j = 0 and j = i over queries i >= 2.

    Queries 0 and 1 are left out: there the previous token, the first token and the token itself
    are not three different keys, so a head could not be told apart from the other kinds.
    """
    if pattern.shape[-1] < 3:
        raise ValueError(f"classifying heads needs at least 3 tokens, got {pattern.shape[-1]}.")
    previous = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)[..., 1:]  # b h (i-2)
    first = pattern[..., 2:, 0]  # b h (i-2)
    itself = pattern.diagonal(dim1=-2, dim2=-1)[..., 2:]  # b h (i-2)
    return torch.stack([s.mean(dim=(0, 2)) for s in (previous, first, itself)], dim=-1)


@torch.no_grad()
def classify_heads(model: TinyDecoderModel, idx: Tensor,
                   threshold: float = 0.4) -> list[HeadScores]:
    """Score every head on idx `(b t)` as previous-token, first-token and self head, and as
    induction head on random tokens of the same shape repeated (`_induction_scores`).

    A score is the mean attention weight on that key, so 1.0 is a perfect head of the kind and
    1/position is what uniform attention would give. Needs t >= 4 (two copies of two tokens).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0.0 <= threshold <= 1.0
    ):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}.")
    names = [f"blocks.{n}.attention.hook_pattern" for n in range(model.config.n_layers)]
    _, cache = run_with_cache(model, idx, names)
    induction = _induction_scores(model, idx.shape, names)
    kinds = (*HEAD_KINDS, INDUCTION)
    result = []
    for layer, name in enumerate(names):
        for head, scores in enumerate(pattern_scores(cache[name]).tolist()):
            scores = [*scores, induction[layer][head]]
            best = max(range(len(kinds)), key=lambda k: scores[k])
            kind = kinds[best] if scores[best] >= threshold else "mixed"
            result.append(HeadScores(layer, head, *scores, kind=kind))
    return result


def _induction_scores(model: TinyDecoderModel, shape: torch.Size,
                      names: list[str]) -> list[list[float]]:
    """Per layer and head, the induction score on seeded random tokens of `shape` `(b t)` repeated
    (same shape as the text, so an intervention sized for it fits here too)."""
    batch, t = shape
    rows = repeated_tokens(model.config.vocab_size, batch, t, torch.Generator().manual_seed(0))
    _, cache = run_with_cache(model, rows.to(next(model.parameters()).device), names)
    return [induction_pattern_scores(cache[name]).tolist() for name in names]


def eval_windows(ids: Sequence[int] | np.ndarray | Tensor, max_seq: int,
                 n_windows: int) -> tuple[Tensor, Tensor]:
    """Up to `n_windows` non-overlapping windows of a token stream, as inputs and next-token
    targets `(b t)` with t = max_seq, taken evenly from the whole stream so the result is
    deterministic. Only the windows are read, so a memory-mapped stream is never copied whole."""
    if not is_int_at_least(n_windows, 1):
        raise ValueError(f"the number of windows must be an integer >= 1, got {n_windows!r}.")
    available = (len(ids) - 1) // max_seq
    if available < 1:
        raise ValueError(f"the text has {len(ids)} tokens; at least {max_seq + 1} are needed.")
    starts = torch.linspace(0, available - 1, min(n_windows, available)).round().long() * max_seq
    rows = windows_at(ids, starts.tolist(), max_seq + 1)
    return rows[:, :-1], rows[:, 1:]


def loss_ends(losses: list[float], parts: int = 10) -> tuple[float, float, int]:
    """Mean loss over the first and over the last `1/parts` of a run's steps, and the number of
    steps k each mean covers (at least one): one batch's loss is noisy, a tenth of a run is not."""
    if not losses:
        raise ValueError("there are no losses to average.")
    k = max(1, len(losses) // parts)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k, k
