"""The suite's hypothesis strategies, example cases and tolerances, in one place.

Configs are *built*, never filtered: heads come from {1, 2, 3, 4, 8}, the per-head width from
1..16, and d_model = heads x width, so head splitting (heads >= 2 with width >= 2) is always in
reach. Every case carries a `seed`; tests make all tensors from it (hypothesis never seeds torch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import example
from hypothesis import strategies as st

from tinygpt import ModelConfig

HEADS = (1, 2, 3, 4, 8)
DTYPES = (torch.float64, torch.float32)

# Tolerances. fp64: forward 1e-10, gradients rtol 1e-8 / atol 1e-9: a few ulps of fp64 after the
# reductions of a small model, far below any real bug. fp32 with initial weights: forward 1e-5
# (torch's own fp32 atol), gradients rtol 1e-4 / atol 1e-5. Larger weights in fp32: `assert_golden`
# (max(1e-5, 5 x the reference's own fp32 error), the rule PyTorch's attention tests use).
FORWARD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10),
               torch.float32: dict(rtol=1e-5, atol=1e-5)}
GRAD_TOL = {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}
GOLDEN_FLOOR, GOLDEN_FUDGE = 1e-5, 5.0


def assert_golden(name: str, candidate32, reference32, reference64) -> None:
    """PyTorch's rule for fp32 against a float64 "golden" run of the reference:
    max|candidate32 - ref64| <= max(1e-5, 5 x max|ref32 - ref64|)."""
    golden = reference64.double()
    own_error = (reference32.double() - golden).abs().max().item()
    error = (candidate32.double() - golden).abs().max().item()
    bound = max(GOLDEN_FLOOR, GOLDEN_FUDGE * own_error)
    assert error <= bound, (
        f"{name}: fp32 error {error:.3g} > {bound:.3g} (reference's own {own_error:.3g})")


@dataclass(frozen=True)
class ModelCase:
    """One drawn model test: a config, an input of `batch` x `t` tokens, a dtype and a seed."""

    config: ModelConfig
    batch: int
    t: int
    dtype: torch.dtype
    seed: int

    def tokens(self) -> torch.Tensor:
        """idx `(b t)`, drawn from `seed`."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randint(self.config.vocab_size, (self.batch, self.t), generator=generator)


@dataclass(frozen=True)
class AttentionCase:
    """One drawn attention test: sizes, a dtype and a seed."""

    n_heads: int
    d_head: int
    batch: int
    t: int
    dtype: torch.dtype
    seed: int

    @property
    def d_model(self) -> int:
        return self.n_heads * self.d_head

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


seeds = st.integers(0, 2**32 - 1)


@st.composite
def model_configs(draw, *, min_d_model: int = 1, max_seq: int = 64, max_layers: int = 2,
                  heads=HEADS) -> ModelConfig:
    """A ModelConfig with d_model = heads x d_head, both norm placements, both activations and the
    seed quirk on and off. `min_d_model >= 2` keeps LayerNorm away from a single feature."""
    n_heads = draw(st.sampled_from(heads))
    d_head = draw(st.integers(max(1, -(-min_d_model // n_heads)), 16))
    return ModelConfig(
        vocab_size=draw(st.integers(2, 64)),
        d_model=n_heads * d_head,
        n_heads=n_heads,
        n_layers=draw(st.integers(1, max_layers)),
        d_ff=draw(st.integers(1, 64)),
        max_seq=draw(st.integers(1, max_seq)),
        norm_first=draw(st.booleans()),
        activation=draw(st.sampled_from(("relu", "gelu"))),
        seed_input_scale=draw(st.booleans()),
    )


@st.composite
def model_cases(draw, *, dtypes=DTYPES, min_t: int = 1, **config_options) -> ModelCase:
    """A config plus batch 1..4, any length min_t..max_seq, a dtype and a seed."""
    config = draw(model_configs(**config_options))
    if config.max_seq < min_t:
        config = replace(config, max_seq=min_t)
    return ModelCase(
        config=config,
        batch=draw(st.integers(1, 4)),
        t=draw(st.integers(min_t, config.max_seq)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(seeds),
    )


@st.composite
def attention_cases(draw, *, heads=HEADS, dtypes=DTYPES, max_t: int = 32) -> AttentionCase:
    """Attention sizes: heads x d_head, batch 1..4, length 1..max_t, a dtype and a seed."""
    return AttentionCase(
        n_heads=draw(st.sampled_from(heads)),
        d_head=draw(st.integers(1, 16)),
        batch=draw(st.integers(1, 4)),
        t=draw(st.integers(1, max_t)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(seeds),
    )


SEED_CONFIG = ModelConfig.preset("seed")
H3_D5_CONFIG = ModelConfig(vocab_size=11, d_model=15, n_heads=3, n_layers=2, d_ff=16, max_seq=9,
                           norm_first=True, activation="gelu")

# Cases every model property is also checked on: the seed model at full length, three heads of
# width five, a single token, the full window, and batch == length (catches a batch_first mix-up).
MODEL_EXAMPLES = (
    ModelCase(SEED_CONFIG, batch=2, t=32, dtype=torch.float64, seed=0),
    ModelCase(SEED_CONFIG, batch=2, t=32, dtype=torch.float32, seed=1),
    ModelCase(H3_D5_CONFIG, batch=3, t=7, dtype=torch.float64, seed=2),
    ModelCase(H3_D5_CONFIG, batch=1, t=1, dtype=torch.float32, seed=3),
    ModelCase(replace(H3_D5_CONFIG, norm_first=False, seed_input_scale=True), batch=2, t=9,
              dtype=torch.float64, seed=4),
    ModelCase(replace(SEED_CONFIG, max_seq=4), batch=4, t=4, dtype=torch.float64, seed=5),
)
ATTENTION_EXAMPLES = (
    AttentionCase(n_heads=4, d_head=8, batch=2, t=32, dtype=torch.float64, seed=0),
    AttentionCase(n_heads=3, d_head=5, batch=2, t=7, dtype=torch.float64, seed=1),
    AttentionCase(n_heads=3, d_head=5, batch=3, t=3, dtype=torch.float32, seed=2),
    AttentionCase(n_heads=2, d_head=4, batch=1, t=1, dtype=torch.float64, seed=3),
    AttentionCase(n_heads=4, d_head=8, batch=4, t=4, dtype=torch.float32, seed=4),
)


def with_examples(cases, *, keep=lambda case: True, **others):
    """Decorate a @given test with `@example(case=c, **others)` for each case `keep` accepts."""
    def decorate(test):
        for case in reversed([c for c in cases if keep(c)]):
            test = example(case=case, **others)(test)
        return test
    return decorate


def model_pair(config: ModelConfig, dtype: torch.dtype, seed: int, *, source: str = "hand",
               bool_mask: bool = False):
    """(hand-written, reference) models in `dtype` with equal weights, copied from `source`."""
    from reference import ReferenceDecoderModel, copy_weights
    from tinygpt import TinyDecoderModel

    torch.manual_seed(seed)
    hand = TinyDecoderModel(config).to(dtype)
    reference = ReferenceDecoderModel(config, bool_mask=bool_mask).to(dtype)
    if source == "hand":
        copy_weights(hand, reference)
    else:
        copy_weights(reference, hand)
    return hand, reference


# ------------------------------------------------------------------------- attention variants

MASK_FAMILIES = ("causal", "window", "prefix", "document", "document+window")


@dataclass(frozen=True)
class VariantCase:
    """One drawn attention-variant test: sizes, a mask family with its parameters, ALiBi on or
    off, key padding on or off, a dtype and a seed.

    `window` counts the keys a query sees (itself included) and may exceed t; `prefix_len` holds
    one prefix length per row, 0..t; `document_starts` marks, per row, the positions that open a
    new document (position 0 always does). Padding is drawn only with the causal and prefix
    families, and never pads key 0, so no query row is left without a key.
    """

    n_heads: int
    n_kv_heads: int
    d_head: int
    batch: int
    t: int
    dtype: torch.dtype
    seed: int
    family: str = "causal"
    window: int | None = None
    prefix_len: tuple[int, ...] | None = None
    document_starts: tuple[tuple[bool, ...], ...] | None = None
    alibi: bool = False
    padding: bool = False

    @property
    def d_model(self) -> int:
        return self.n_heads * self.d_head

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def document_ids(self) -> torch.Tensor:
        """`(b t)`: 0 for the first document of a row, counting up at each start."""
        starts = torch.tensor(self.document_starts, dtype=torch.long)
        starts[:, 0] = 0
        return starts.cumsum(dim=1)

    def is_pad(self) -> torch.Tensor:
        """`(b j)`, True for padded keys (drawn from the seed; key 0 never)."""
        is_pad = torch.rand(self.batch, self.t, generator=self.generator()) < 0.3
        is_pad[:, 0] = False
        return is_pad


@st.composite
def variant_cases(draw, *, heads=HEADS, dtypes=DTYPES, max_t: int = 24, families=MASK_FAMILIES,
                  alibi=(False, True), grouped: bool = True, even_width: bool = False):
    """A VariantCase; its key/value heads divide the heads when `grouped`, else equal them."""
    n_heads = draw(st.sampled_from(heads))
    divisors = [g for g in range(1, n_heads + 1) if n_heads % g == 0]
    n_kv_heads = draw(st.sampled_from(divisors)) if grouped else n_heads
    d_head = draw(st.integers(1, 8).map(lambda d: 2 * d) if even_width else st.integers(1, 16))
    batch, t = draw(st.integers(1, 3)), draw(st.integers(1, max_t))
    family = draw(st.sampled_from(families))
    window = draw(st.integers(1, t + 3)) if "window" in family else None
    prefix_len = (tuple(draw(st.lists(st.integers(0, t), min_size=batch, max_size=batch)))
                  if family == "prefix" else None)
    document_starts = None
    if "document" in family:
        row = st.lists(st.booleans(), min_size=t, max_size=t).map(tuple)
        document_starts = tuple(draw(st.lists(row, min_size=batch, max_size=batch)))
    return VariantCase(
        n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head, batch=batch, t=t,
        dtype=draw(st.sampled_from(dtypes)), seed=draw(seeds), family=family, window=window,
        prefix_len=prefix_len, document_starts=document_starts,
        alibi=draw(st.sampled_from(alibi)),
        padding=family in ("causal", "prefix") and draw(st.booleans()),
    )


def _every_other_start(batch: int, t: int) -> tuple[tuple[bool, ...], ...]:
    return tuple(tuple(p % 2 == 0 for p in range(t)) for _ in range(batch))


# Fixed cases: a window of one key, a window longer than the sequence, one-token documents, a
# prefix covering everything and an empty one, multi-query, and ALiBi with a non-power-of-two
# head count (3 heads: the paper's interleaving rule).
VARIANT_EXAMPLES = (
    VariantCase(4, 4, 8, 2, 16, torch.float64, 0, family="window", window=1),
    VariantCase(3, 3, 5, 2, 7, torch.float64, 1, family="window", window=10, alibi=True),
    VariantCase(2, 1, 4, 2, 6, torch.float64, 2, family="document",
                document_starts=_every_other_start(2, 6)),
    VariantCase(4, 2, 4, 2, 9, torch.float64, 3, family="document",
                document_starts=tuple(tuple([True] * 9) for _ in range(2))),
    VariantCase(3, 1, 4, 2, 8, torch.float64, 4, family="prefix", prefix_len=(8, 0), alibi=True),
    VariantCase(6, 3, 2, 3, 5, torch.float32, 5, family="prefix", prefix_len=(5, 2, 1),
                padding=True, alibi=True),
    VariantCase(8, 8, 3, 1, 12, torch.float64, 6, family="document+window", window=3,
                document_starts=((True,) + (False,) * 5 + (True,) + (False,) * 5,), alibi=True),
)


@dataclass(frozen=True)
class VariantModelCase(ModelCase):
    """A ModelCase whose config has an attention variant, and the forward's own keywords: per
    row document starts (position 0 always opens one) or prefix lengths."""

    document_starts: tuple[tuple[bool, ...], ...] | None = None
    prefix_len: tuple[int, ...] | None = None

    def forward_kwargs(self) -> dict:
        kwargs = {}
        if self.document_starts is not None:
            starts = torch.tensor(self.document_starts, dtype=torch.long)
            starts[:, 0] = 0
            kwargs["document_ids"] = starts.cumsum(dim=1)
        if self.prefix_len is not None:
            kwargs["prefix_len"] = torch.tensor(self.prefix_len)
        return kwargs


@st.composite
def variant_model_cases(draw, *, dtypes=DTYPES, min_d_model: int = 1, max_seq: int = 24,
                        max_layers: int = 3, positions=("learned", "alibi", "rope", "none"),
                        masks=("causal", "window", "document", "prefix"),
                        grouped: bool = True) -> VariantModelCase:
    """A variant model (position kind, window, grouped heads if `grouped`) with documents or a
    prefix drawn for its input. Prefix-LM is never combined with a window or documents (the
    model refuses)."""
    position = draw(st.sampled_from(positions))
    n_heads = draw(st.sampled_from(HEADS))
    low = max(1, -(-min_d_model // n_heads))
    widths = st.integers(-(-low // 2), 8).map(lambda d: 2 * d) if position == "rope" else \
        st.integers(low, 16)
    d_head = draw(widths)
    mask = draw(st.sampled_from(masks))
    t_max = draw(st.integers(1, max_seq))
    config = ModelConfig(
        vocab_size=draw(st.integers(2, 64)), d_model=n_heads * d_head, n_heads=n_heads,
        n_layers=draw(st.integers(1, max_layers)), d_ff=draw(st.integers(1, 64)), max_seq=t_max,
        norm_first=draw(st.booleans()), activation=draw(st.sampled_from(("relu", "gelu"))),
        seed_input_scale=draw(st.booleans()), position=position,
        window=draw(st.integers(1, t_max + 2)) if mask == "window" else None,
        n_kv_heads=draw(st.sampled_from([g for g in HEADS if n_heads % g == 0]))
        if grouped else None,
    )
    batch, t = draw(st.integers(1, 3)), draw(st.integers(1, t_max))
    document_starts = prefix_len = None
    if mask == "document":
        row = st.lists(st.booleans(), min_size=t, max_size=t).map(tuple)
        document_starts = tuple(draw(st.lists(row, min_size=batch, max_size=batch)))
    if mask == "prefix":
        prefix_len = tuple(draw(st.lists(st.integers(0, t), min_size=batch, max_size=batch)))
    return VariantModelCase(config=config, batch=batch, t=t, dtype=draw(st.sampled_from(dtypes)),
                            seed=draw(seeds), document_starts=document_starts,
                            prefix_len=prefix_len)


def _variant(config: ModelConfig, **fields) -> ModelConfig:
    return replace(config, **fields)


# Every variant on fixed inputs: windows of one key and of two across three layers (the window
# compounds: two layers of window 2 reach three positions back), one-token documents, a prefix
# covering everything, multi-query RoPE, ALiBi with three heads, no positions at all.
VARIANT_MODEL_EXAMPLES = (
    VariantModelCase(_variant(SEED_CONFIG, position="alibi", window=1, max_seq=12), 2, 12,
                     torch.float64, 0),
    VariantModelCase(_variant(H3_D5_CONFIG, position="alibi", window=2, n_layers=3), 2, 9,
                     torch.float64, 1),
    VariantModelCase(_variant(SEED_CONFIG, position="rope", n_kv_heads=1, max_seq=10), 2, 10,
                     torch.float64, 2, document_starts=tuple(tuple([True] * 10) for _ in "ab")),
    VariantModelCase(_variant(SEED_CONFIG, position="learned", max_seq=8), 2, 8, torch.float64, 3,
                     document_starts=((True, False, False, True, False, True, False, False),) * 2),
    VariantModelCase(_variant(SEED_CONFIG, position="rope", n_kv_heads=2, max_seq=8), 3, 8,
                     torch.float64, 4, prefix_len=(8, 0, 3)),
    VariantModelCase(_variant(H3_D5_CONFIG, position="none", n_kv_heads=1), 2, 9, torch.float64, 5,
                     prefix_len=(4, 9)),
)
