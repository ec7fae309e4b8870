"""Watch induction heads form: a 2-layer attention-only model trained on text mixed with rows of
random tokens that contain a copied segment, its heads scored at every evaluation (Olsson et al.
2022, in miniature).

Text rows (a character-level corpus such as Tiny Shakespeare) reward previous-token heads and
n-gram statistics; in the random rows the second copy of a segment can only be predicted by
looking up the first, which rewards induction alone (`copied_segment_rows` says why the copy's
length and distance vary). Repeats within a short window of prose are rare, so text alone pays
little for the circuit in a run of a couple of minutes. The in-context-learning score is measured
on held-out text only, so it shows whether the circuit learned on the random rows helps on prose.

This is a small loop of its own rather than `tinygpt.train.train`: the trainer samples one token
file and logs a fixed set of metrics, while this run mixes two sources and logs head scores."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from tinygpt.circuits import (
    composition_scores,
    in_context_learning_score,
    induction_scores,
    previous_token_scores,
    token_losses,
)
from tinygpt.config import ModelConfig, is_int_at_least
from tinygpt.induction import repeated_tokens
from tinygpt.inspection import eval_windows
from tinygpt.model import TinyDecoderModel, next_token_loss
from tinygpt.pictures import save_figure
from tinygpt.tokenizer import CharTokenizer


@dataclass(frozen=True)
class InductionSettings:
    """The run: model sizes, optimisation, the share of repeated rows and how often to measure."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    eval_every: int = 40
    repeat_fraction: float = 0.75  # of each batch's rows: random tokens with a copied segment
    d_model: int = 64
    n_heads: int = 2
    max_seq: int = 32
    eval_windows: int = 512  # held-out text windows for the loss and the in-context score
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "d_model", "n_heads", "max_seq",
                     "eval_windows"):
            value = getattr(self, name)
            if not is_int_at_least(value, 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise ValueError(f"repeat_fraction must be in [0, 1], got {self.repeat_fraction!r}.")
        if self.max_seq < 10:
            raise ValueError(f"max_seq must be at least 10 for the in-context score, got "
                             f"{self.max_seq}.")

    @property
    def early(self) -> int:
        """The early position of the in-context score: a tenth of the way into the context
        (Olsson et al. compare token 50 with token 500 of 512)."""
        return self.max_seq // 10

    @property
    def late(self) -> int:
        """The late position of the in-context score: the last one."""
        return self.max_seq - 1


@dataclass(frozen=True)
class InductionResult:
    """Where the run wrote its files, the step where the induction score jumped and the heads of
    the circuit it found (`previous` feeds `induction` through K-composition)."""

    metrics: Path
    figure: Path
    checkpoint: Path
    jump_step: int | None
    previous_head: tuple[int, int]
    induction_head: tuple[int, int]
    k_composition: float


def copied_segment_rows(vocab_size: int, batch: int, t: int, generator: torch.Generator) -> Tensor:
    """`(b t)` rows of random tokens in which one random segment (4 to t/2 tokens long) appears
    a second time, later, at a random place.

    The length and the distance vary from row to row on purpose: with one fixed period a head
    attending a fixed number of positions back predicts the copy as well as an induction head
    does, and a 2-layer model learns that shortcut first (it then scores as an induction head on
    rows of the same period, without looking at tokens at all).
    """
    rows = torch.randint(vocab_size, (batch, t), generator=generator)
    for row in rows:
        length = int(torch.randint(4, t // 2 + 1, (1,), generator=generator))
        first = int(torch.randint(0, t - 2 * length + 1, (1,), generator=generator))
        second = int(torch.randint(first + length, t - length + 1, (1,), generator=generator))
        row[second:second + length] = row[first:first + length]
    return rows


class _Batches:
    """Training rows `(b t+1)`: text windows and rows with a copied segment, from one seeded
    generator; the two kinds are shuffled together so no row position favours either."""

    def __init__(self, ids: Tensor, vocab_size: int, settings: InductionSettings):
        self.ids, self.vocab_size, self.settings = ids, vocab_size, settings
        self.generator = torch.Generator().manual_seed(settings.seed + 1)

    def next(self) -> tuple[Tensor, Tensor]:
        s, g = self.settings, self.generator
        n_repeat = round(s.repeat_fraction * s.batch_size)
        starts = torch.randint(len(self.ids) - s.max_seq - 1, (s.batch_size - n_repeat, 1),
                               generator=g)
        text = self.ids[starts + torch.arange(s.max_seq + 1)]  # b (t+1)
        repeats = copied_segment_rows(self.vocab_size, n_repeat, s.max_seq + 1, g)
        rows = torch.cat([text, repeats])[torch.randperm(s.batch_size, generator=g)]
        return rows[:, :-1], rows[:, 1:]


def _evaluate(model: TinyDecoderModel, text: tuple[Tensor, Tensor], probe: Tensor,
              settings: InductionSettings) -> dict:
    """One line of the log: text loss, in-context score and every head's two scores."""
    model.eval()
    losses = token_losses(model, *text)
    record = {
        "val_loss": float(losses.mean()),
        "in_context": in_context_learning_score(losses, settings.early, settings.late),
        "induction": induction_scores(model, probe).tolist(),  # l h, on repeated random tokens
        "previous_token": previous_token_scores(model, text[0]).tolist(),  # l h, on text
    }
    model.train()
    return record


def run_induction(text: str, out_dir: str | Path, settings: InductionSettings | None = None,
                  on_eval=None) -> InductionResult:
    """Train, scoring heads every `eval_every` steps; write `metrics.jsonl`, `induction.png` and a
    checkpoint to `out_dir`. `on_eval(record)` sees each log line (for a progress display).

    Seeded, and run on one thread (restored afterwards): the matrices are tiny, so one thread is
    about as fast on an idle machine and much faster on a busy one, and the result does not
    depend on how many cores the machine has. The same settings and text give the same log and
    the same figure, byte for byte.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(text, Path(out_dir), settings or InductionSettings(), on_eval)
    finally:
        torch.set_num_threads(threads)


def _run(text: str, out_dir: Path, settings: InductionSettings, on_eval) -> InductionResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(0.9 * len(ids))
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=settings.d_model,
                         n_heads=settings.n_heads, n_layers=2, max_seq=settings.max_seq,
                         norm_first=True, attn_only=True)
    torch.manual_seed(settings.seed)
    model = TinyDecoderModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    batches = _Batches(ids[:split], config.vocab_size, settings)
    held_out = eval_windows(ids[split:], config.max_seq, settings.eval_windows)
    probe = repeated_tokens(config.vocab_size, 64, config.max_seq,
                            torch.Generator().manual_seed(settings.seed + 2))
    records, losses = [], []
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step == settings.steps:
            record = {"step": step, **_evaluate(model, held_out, probe, settings)}
            if losses:  # the mean since the last evaluation: one batch alone is noisy
                record["train_loss"] = sum(losses) / len(losses)
            records.append(record)
            losses = []
            if on_eval is not None:
                on_eval(record)
        if step == settings.steps:
            break
        x, y = batches.next()
        loss = next_token_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return _finish(model, tokenizer, records, out_dir, settings)


def _finish(model: TinyDecoderModel, tokenizer: CharTokenizer, records: list[dict],
            out_dir: Path, settings: InductionSettings) -> InductionResult:
    """Name the circuit, write the log, the figure and the checkpoint."""
    from tinygpt.checkpoint import save_checkpoint

    final = torch.tensor(records[-1]["induction"])  # l h
    induction_head = (1, int(final[1].argmax()))
    k_composition = composition_scores(model)["k"][0][:, induction_head[1]]  # e
    previous_head = (0, int(k_composition.argmax()))
    jump = jump_step(records, induction_head)
    metrics = out_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary = {"settings": asdict(settings), "jump_step": jump,
               "previous_head": previous_head, "induction_head": induction_head,
               "k_composition": k_composition.tolist()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    figure = plot_induction(records, out_dir / "induction.png", jump, settings, induction_head)
    checkpoint = save_checkpoint(out_dir, model=model, tokenizer=tokenizer,
                                 step=records[-1]["step"], meta={"experiment": summary})
    return InductionResult(metrics, figure, checkpoint, jump, previous_head, induction_head,
                           float(k_composition.max()))


def jump_step(records: list[dict], head: tuple[int, int]) -> int | None:
    """The first evaluated step where `head`'s induction score passes halfway from its first
    value to its highest: where the score jumps. None if it never rises by 0.2."""
    scores = [r["induction"][head[0]][head[1]] for r in records]
    low, high = scores[0], max(scores)
    if high - low < 0.2:
        return None
    return next(r["step"] for r, s in zip(records, scores) if s >= (low + high) / 2)


def plot_induction(records: list[dict], path: Path, jump: int | None,
                   settings: InductionSettings, head: tuple[int, int]) -> Path:
    """Four panels over training steps: losses, induction scores, previous-token scores and the
    in-context score, with the jump marked. Drawn with matplotlib's object API (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in records]
    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).flatten()
    trained = [r for r in records if "train_loss" in r]
    axes[0].plot([r["step"] for r in trained], [r["train_loss"] for r in trained],
                 label="train (text + repeats)", color="0.6", lw=1)
    axes[0].plot(steps, [r["val_loss"] for r in records], label="held-out text", color="C3")
    axes[0].set(title="loss (nats per character)", ylabel="loss")
    for key, ax, title in (("induction", axes[1], "induction score (random tokens repeated)"),
                           ("previous_token", axes[2], "previous-token score (text)")):
        for layer, style in ((0, "--"), (1, "-")):
            for h in range(settings.n_heads):
                ax.plot(steps, [r[key][layer][h] for r in records], style, color=f"C{h}",
                        lw=2.2 if (layer, h) == head else 1.2, label=f"L{layer}H{h}")
        ax.set(title=title, ylabel="mean attention", ylim=(-0.02, 1.02))
    axes[1].legend(ncols=2, fontsize=7)
    axes[3].plot(steps, [r["in_context"] for r in records], color="C2")
    axes[3].set(title=f"in-context score: loss at token {settings.late} minus token "
                      f"{settings.early}", ylabel="nats")
    for ax in axes:
        if jump is not None:
            ax.axvline(jump, color="k", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("training step")
    marked = f"; the induction score of L{head[0]}H{head[1]} jumps at step {jump}" if jump else ""
    figure.suptitle(f"2-layer attention-only model, seed {settings.seed}{marked}")
    return save_figure(figure, path, dpi=100, metadata={"Software": None})
