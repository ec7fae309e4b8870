"""The training loop: AdamW, warmup + cosine, clipping, periodic evaluation, crash-safe checkpoints
that resume bit-identically, and data-parallel training through `torch.distributed`.

`train` reads top to bottom as the steps of a run. `_Trainer` holds what those steps share (the
model, its optimizer, the data and its generator, the device, the process group and the run's
directory), so each step is a short method instead of a function of ten parameters.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tinygpt.checkpoint import CheckpointError
from tinygpt.config import ModelConfig, is_int_at_least
from tinygpt.data import TokenData, separator_document_ids
from tinygpt.devices import pick_device
from tinygpt.model import TinyDecoderModel, gpt2_init, next_token_loss
from tinygpt.rundir import RunDir
from tinygpt.tokenizer import Tokenizer

INITS = ("model", "gpt2")  # the model's own (seed) initialisation, or GPT-2's


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the model's sizes. `batch_size` is the global batch per step
    (split across processes, times `grad_accum` micro-batches)."""

    steps: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    seed: int = 1337
    device: str = "cpu"
    compile: bool = False
    init: str = "model"
    # A token that ends each document of a packed corpus: with it, no token attends across a
    # document boundary and positions restart in each document (`TinyDecoderModel.forward`).
    document_separator: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
                     "save_every"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("warmup_steps", self.warmup_steps, low=0)
        _check_int("seed", self.seed, low=0, high=2**63 - 3)  # seed + 2 seeds a generator too
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            _check_finite(name, getattr(self, name))
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(
                f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}."
            )
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.grad_clip < 0:
            raise ValueError(
                f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}."
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.document_separator is not None:
            _check_int("document_separator", self.document_separator, low=0)
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> None:
    if not is_int_at_least(value, low) or (
            high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")


def _check_finite(name: str, value: Any) -> None:
    """A NaN would compare false with every bound (and `--grad-clip nan` turn clipping off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


@dataclass
class TrainResult:
    """Where a run stopped. `interrupted` names the signal (SIGINT or SIGTERM) that stopped it
    early, after saving; None when it ran to its last step."""

    step: int
    checkpoint: Path | None
    val_loss: float | None
    interrupted: str | None = None


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW decaying only matrices (2-D+); biases, LayerNorm gains and the like are not decayed.

    The fused kernel (CPU and CUDA) updates all parameters in one pass: about 5x faster than the
    per-parameter loop for this model's ~50 tensors on CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


class StopSignals:
    """Catch SIGINT (Ctrl-C) and SIGTERM (`kill`, `timeout`, `docker stop`, a cluster scheduler)
    for the `with` block, so a loop can stop at a step boundary and save instead of dying
    mid-update. `received` names the first signal caught, or is None. Outside the main thread
    (where Python cannot set handlers) it catches nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train(run_dir: str | Path, data: TokenData, tokenizer: Tokenizer, model_config: ModelConfig,
          config: TrainConfig, *, resume: bool = False, progress: bool = False,
          until: int | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir` and return where it stopped.

    `until` stops (and saves) after that step without changing the schedule, which is planned
    for `config.steps`: a run split in pieces follows the same path as one run. SIGINT or
    SIGTERM stops the run after the step in progress, saved (see `TrainResult.interrupted`).

    The run directory is locked for the whole run (`RunDir.lock`): a second process training
    the same run is refused at once. Under `torch.distributed` each process draws the same global
    batch from the same seeded generator and keeps its own slice, so N processes follow the
    single-process loss curve. Only rank 0 writes, and locks.
    """
    run = RunDir(run_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    with StopSignals() as stop, run.lock() if rank == 0 else nullcontext():
        # Set up: check the inputs, build model, optimizer and batch generator from the seed.
        trainer = _Trainer.build(run, data, tokenizer, model_config, config)
        # Restore: a resumed run continues from its newest checkpoint (weights, optimizer, RNGs).
        step = trainer.restore(run.resume_from(resume))
        # Place: model and optimizer state on the device, the model wrapped for DDP or compiled.
        trainer.move_to_device()
        last_step = config.steps if until is None else min(until, config.steps)
        result = _loop(trainer, step, last_step, stop, progress)
        if trainer.rank == 0:
            run.plot_loss_curve()
    return result


def _loop(trainer: _Trainer, step: int, last_step: int, stop: StopSignals,
          progress: bool) -> TrainResult:
    """The steps from `step` to `last_step`, or to the step during which a stop signal came."""
    config = trainer.config
    val_loss, interrupted = None, False
    with _progress_bar(progress and trainer.rank == 0, step, config.steps) as bar:
        while step < last_step:
            started = time.perf_counter()
            # Accumulate gradients over the micro-batches, at this step's learning rate.
            lr = trainer.set_lr(step)
            train_loss = trainer.accumulate_gradients()
            trainer.check_loss(train_loss, step + 1)  # stop on a non-finite loss
            # Clip and step: one optimizer update.
            trainer.clip_and_step()
            step += 1
            record = trainer.record(step, train_loss, lr, time.perf_counter() - started)
            # Evaluate every `eval_every` steps and at the end of the schedule.
            if step % config.eval_every == 0 or step == config.steps:
                val_loss = record["val_loss"] = trainer.evaluate()
                trainer.check_loss(val_loss, step, what="validation loss")
            # Log: one metrics line (rank 0) and the progress bar.
            trainer.log(record)
            _show(bar, record, val_loss)
            # Save every `save_every` steps, at the last step, and when a stop was asked for.
            interrupted = trainer.stop_requested(stop.received is not None)
            if step % config.save_every == 0 or step == last_step or interrupted:
                trainer.save(step, val_loss)
            if interrupted:
                break
    return TrainResult(step=step, checkpoint=trainer.last_checkpoint, val_loss=val_loss,
                       interrupted=(stop.received or "SIGTERM") if interrupted else None)


@dataclass
class _Trainer:
    """What the steps of one run share. Built on the CPU from the seed; `restore` may then load a
    checkpoint into it, and `move_to_device` puts it where it trains."""

    run: RunDir
    config: TrainConfig
    model_config: ModelConfig
    data: TokenData
    tokenizer: Tokenizer
    rank: int
    world: int
    device: torch.device
    model: TinyDecoderModel
    optimizer: torch.optim.Optimizer
    batches: torch.Generator  # draws the training batches; saved and restored with the run
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]  # the same at every evaluation
    autocast: AbstractContextManager  # bfloat16 on CUDA, nothing on CPU
    net: nn.Module  # the model as called: maybe wrapped in DDP and compiled
    last_checkpoint: Path | None = None

    @classmethod
    def build(cls, run: RunDir, data: TokenData, tokenizer: Tokenizer, model_config: ModelConfig,
              config: TrainConfig) -> _Trainer:
        """Check that the inputs fit together, pick this process's device, and build the model,
        the optimizer and the generators from the seed."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        _check_inputs(data, tokenizer, model_config, config, world)
        device = _process_device(config.device, rank, world)
        torch.manual_seed(config.seed)
        model = TinyDecoderModel(model_config)
        if config.init == "gpt2":
            gpt2_init(model)
        per_rank = config.batch_size // config.grad_accum // world
        return cls(
            run=run, config=config, model_config=model_config, data=data, tokenizer=tokenizer,
            rank=rank, world=world, device=device, model=model, net=model,
            optimizer=make_optimizer(model, config),
            batches=torch.Generator().manual_seed(config.seed + 1),
            val_batches=_fixed_batches(data, config, model_config.max_seq, per_rank, rank, world),
            autocast=(torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                      else nullcontext()),
        )

    def restore(self, path: Path | None) -> int:
        """Load weights, optimizer and RNG state from the checkpoint `path` (refusing one of
        another config or tokenizer), cut the metrics back to its step, and return that step.
        With no checkpoint, keep the fresh state, empty the metrics (a failed earlier attempt
        may have left some) and return 0."""
        if path is None:
            if self.rank == 0:
                self.run.truncate_metrics(0)
            return 0
        ckpt, state = self.run.load(path)
        if ckpt.tokenizer.to_dict() != self.tokenizer.to_dict():  # first: it decides vocab_size
            raise CheckpointError(
                f"cannot resume: the checkpoint in {str(ckpt.path)!r} was trained with another "
                f"tokenizer ({ckpt.tokenizer.vocab_size} tokens; this run's has "
                f"{self.tokenizer.vocab_size}); resume with the run's own corpus and tokenizer."
            )
        if ckpt.config != self.model_config:
            theirs, ours = ckpt.config.to_dict(), self.model_config.to_dict()
            name = next(k for k in ours if ours[k] != theirs[k])
            raise CheckpointError(
                f"cannot resume: the checkpoint has {name}={theirs[name]!r} but this run asks for "
                f"{name}={ours[name]!r}."
            )
        if "optimizer" not in state:
            raise CheckpointError(
                f"cannot resume: the checkpoint in {str(ckpt.path)!r} holds no optimizer state "
                f"(it was imported, not trained here), so there is no run to continue exactly."
            )
        self.model.load_state_dict(ckpt.model.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.batches.set_state(state["batch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.rank == 0:
            self.run.truncate_metrics(ckpt.step)
        self.last_checkpoint = path
        return ckpt.step

    def move_to_device(self) -> None:
        """Move the model and the optimizer's state to the device; wrap the model in DDP across
        processes and compile it when asked."""
        self.model.to(self.device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(self.device)
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model)
        if self.config.compile:
            self.net = torch.compile(self.net)

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def accumulate_gradients(self) -> float:
        """Forward and backward `grad_accum` micro-batches; return the step's mean loss (all ranks).

        Every rank draws the same global micro-batch `(micro t)` and keeps its `micro / world` rows;
        DDP averages the gradients, so the step equals one process on the whole batch.
        """
        self.model.train()
        accum, world = self.config.grad_accum, self.world
        micro = self.config.batch_size // accum
        lo, hi = self.rank * micro // world, (self.rank + 1) * micro // world
        loss_sum = torch.zeros((), device=self.device)
        for k in range(accum):
            x, y = self.data.batch("train", micro, self.model_config.max_seq, self.batches)
            x = x[lo:hi].to(self.device, non_blocking=True)
            y = y[lo:hi].to(self.device, non_blocking=True)
            # DDP all-reduces gradients on every backward unless told not to: only on the last.
            sync = nullcontext() if world == 1 or k == accum - 1 else self.net.no_sync()
            with sync, self.autocast:
                loss = next_token_loss(self.logits(x), y) / accum
            loss.backward()
            loss_sum += loss.detach()
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        return loss_sum.item()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model on windows x `(b t)`; with a document separator, one document never sees
        another inside a window."""
        if self.config.document_separator is None:
            return self.net(x)
        return self.net(x, document_ids=separator_document_ids(x, self.config.document_separator))

    def check_loss(self, loss: float, step: int, what: str = "loss") -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"{what} became {loss} at step {step}; stopped, keeping the last good checkpoint "
                f"({self.last_checkpoint or 'no checkpoint yet'}). Try a lower --lr."
            )

    def clip_and_step(self) -> None:
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def record(self, step: int, train_loss: float, lr: float, seconds: float) -> dict[str, Any]:
        """The step's line of metrics (the validation loss is added when it is measured)."""
        tokens = self.config.batch_size * self.model_config.max_seq
        return {"step": step, "train_loss": train_loss, "lr": lr,
                "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (averaged across processes)."""
        self.net.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val_batches:
            with self.autocast:
                total += next_token_loss(self.logits(x.to(self.device)),
                                         y.to(self.device)).float()
        total /= len(self.val_batches)
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        self.net.train()
        return total.item()

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.run.append_metrics(record)

    def stop_requested(self, raised: bool) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if self.world == 1:
            return raised
        flag = torch.tensor([float(raised)], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def save(self, step: int, val_loss: float | None) -> None:
        """Checkpoint the finite weights (rank 0 writes; the others wait for it)."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"weights became non-finite at step {step}; stopped, keeping the last good "
                f"checkpoint ({self.last_checkpoint or 'no checkpoint yet'}). Try a lower --lr."
            )
        if self.rank == 0:
            self.last_checkpoint = self.run.save(
                model=self.model, tokenizer=self.tokenizer, step=step,
                meta={"train": self.config.to_dict()}, state=self._state(val_loss),
            )
        if self.world > 1:
            dist.barrier()

    def _state(self, val_loss: float | None) -> dict[str, Any]:
        """What, beside the weights, a resumed run needs to continue bit-identically."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "batch_rng": self.batches.get_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "val_loss": val_loss,
        }


def _check_inputs(data: TokenData, tokenizer: Tokenizer, model_config: ModelConfig,
                  config: TrainConfig, world: int) -> None:
    """The batch splits evenly, the tokenizer fits the model, and the data fits its window."""
    micro = config.batch_size // config.grad_accum
    if micro * config.grad_accum != config.batch_size or micro % world:
        raise ValueError(
            f"batch_size {config.batch_size} must split evenly into grad_accum={config.grad_accum} "
            f"micro-batches across {world} process(es)."
        )
    if tokenizer.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"tokenizer vocab_size {tokenizer.vocab_size} does not match the model's "
            f"vocab_size {model_config.vocab_size}."
        )
    data.check_window(model_config.max_seq)


def _process_device(name: str, rank: int, world: int) -> torch.device:
    """The device named by `name`; with several processes on CUDA, one GPU per process."""
    device = pick_device(name)
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _fixed_batches(data: TokenData, config: TrainConfig, max_seq: int, per_rank: int,
                   rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches at every evaluation (their own seed), this rank's share."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    batches = [data.batch("val", per_rank * world, max_seq, generator)
               for _ in range(config.eval_batches)]
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return [(x[rows], y[rows]) for x, y in batches]


def _progress_bar(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _show(bar, record: dict[str, Any], val_loss: float | None) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                    **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
