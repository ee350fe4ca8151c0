"""Greedy selection runs batched over the images of a forward, with exactly the picks each image gets alone."""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import vtprune
from vtprune.engine.selection import select_tokens
from vtprune.errors import VTPruneError
from vtprune.schedule import Budget
from vtprune.strategies import DivPrune, GreedyStrategy, Strategy, coverage, diversity, divprune, todre, zoo
from vtprune.strategies.base import TokenContext
from vtprune.strategies.registry import make_strategy
from vtprune.testing import peak_extra_bytes

# (name, options) of every built-in greedy strategy and method/variant.
GREEDY = [
    ("divprune", {}),
    ("todre", {}),
    ("todre", {"method": "max-sum"}),
    ("mmtok", {}),
    ("mmtok", {"variant": "vision"}),
    ("mmtok", {"variant": "text"}),
    ("zoo", {"directions": 3}),
    ("cdpruner", {}),
    ("cdpruner", {"theta": 0.5, "negative_relevance": True}),
]

# The most ops a pick may take: CDPruner's incremental Cholesky step also gathers the earlier factors at the pick,
# forms the residual row and the new factor entry, and updates every gain (Chen et al. 2018, Alg. 1).
OPS_PER_PICK = {"cdpruner": 20}

# Small sizes and few examples: the machine is shared and a wrong group is cheap to find.
fast = settings(max_examples=30, deadline=None)

_PROJECTION = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))


def projector(rows: torch.Tensor) -> torch.Tensor:
    return torch.tanh(rows @ _PROJECTION)


def tokens(gen: torch.Generator, n: int, d: int, kind: str) -> torch.Tensor:
    """Gaussian rows, clusters with exact duplicates, or small integers (many exact ties)."""
    if kind == "gaussian":
        return torch.randn(n, d, generator=gen)
    if kind == "duplicates":
        centres = torch.randn(max(1, n // 4), d, generator=gen)
        return centres[torch.randint(len(centres), (n,), generator=gen)]
    return torch.randint(-2, 3, (n, d), generator=gen).float()


@st.composite
def groups(draw: st.DrawFn) -> list[TokenContext]:
    """Images with the same token count, width (6, the projector's output) and budget whose other inputs differ:
    question lengths (some equal, some none or empty), [CLS] pivots or none, pre-projector features or none, seeds."""
    n, images = draw(st.integers(1, 80)), draw(st.integers(1, 5))
    keep = draw(st.integers(1, n))
    kind = draw(st.sampled_from(["gaussian", "duplicates", "integers"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    contexts = []
    for _ in range(images):
        words = draw(st.sampled_from([None, 0, 2, 3]))
        pre = tokens(gen, n, 5, kind)
        contexts.append(
            TokenContext(
                features=projector(pre) if kind == "gaussian" else tokens(gen, n, 6, kind),
                keep=keep,
                seed=draw(st.integers(0, 2**31 - 1)),
                text_embeds=None if words is None else tokens(gen, words, 6, kind),
                pre_features=pre if draw(st.booleans()) else None,
                cls_attention=torch.rand(n, generator=gen) if draw(st.booleans()) else None,
                projector=projector,
            )
        )
    return contexts


@pytest.mark.parametrize(("name", "options"), GREEDY, ids=[f"{n}{o}" for n, o in GREEDY])
@fast
@given(contexts=groups())
def test_a_group_picks_what_each_image_picks_alone(name: str, options: dict, contexts: list[TokenContext]) -> None:
    strategy = make_strategy(name, **options)
    if name == "zoo":  # it needs every image's pre-projector features
        contexts = [ctx if ctx.pre_features is not None else _with_pre_features(ctx) for ctx in contexts]
    together = strategy.order_batch(contexts)
    assert len(together) == len(contexts)
    for ctx, order in zip(contexts, together, strict=True):
        alone = strategy.order(ctx)
        assert order.dtype == torch.int64 and torch.equal(order, alone)
        assert len(set(order.tolist())) == ctx.keep
    assert all(torch.equal(a, b.sort().values) for a, b in zip(strategy.select_batch(contexts), together, strict=True))


def _with_pre_features(ctx: TokenContext) -> TokenContext:
    pre = torch.randn(ctx.num_tokens, 5, generator=torch.Generator().manual_seed(ctx.seed))
    return TokenContext(features=projector(pre), keep=ctx.keep, seed=ctx.seed, pre_features=pre, projector=projector)


@pytest.mark.parametrize("name", ["divprune", "mmtok"])
@fast
@given(data=st.data())
def test_the_engine_groups_images_of_a_forward_and_selects_each_as_alone(name: str, data: st.DataObject) -> None:
    # Images of several sizes, some with newline tokens dropped, one too small to prune: each gets the same
    # kept indices from select_tokens over the whole list as from select_tokens over itself.
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    budget = Budget(keep_ratio=data.draw(st.sampled_from([0.25, 0.5, 0.9])))
    images = []
    for _ in range(data.draw(st.integers(1, 6))):
        n = data.draw(st.sampled_from([1, 9, 12]))
        newline = torch.rand(n, generator=gen) < 0.2 if data.draw(st.booleans()) else None
        words = data.draw(st.sampled_from([0, 3]))
        text_embeds = torch.randn(words, 4, generator=gen)
        features = torch.randn(n, 4, generator=gen)
        images.append(TokenContext(features=features, keep=n, newline=newline, text_embeds=text_embeds))
    strategy = make_strategy(name)
    together = select_tokens(strategy, budget, images, newlines="drop")
    for image, kept in zip(images, together, strict=True):
        assert torch.equal(kept, select_tokens(strategy, budget, [image], newlines="drop")[0])


class Counting(DivPrune):
    """DivPrune that records the size of every group it is given."""

    def __init__(self) -> None:
        self.groups: list[int] = []

    def order_batch(self, contexts):
        self.groups.append(len(contexts))
        return super().order_batch(contexts)


@pytest.mark.parametrize("layer", [None, 1])
def test_hooks_select_same_sized_images_as_one_group(models, make_inputs, layer):
    model = models("llava")  # three images of one size in three rows (one row text-only)
    inputs = make_inputs(model, "llava", 3)
    counting = Counting()
    with torch.no_grad():
        with vtprune.pruned(model, counting, keep=3, layer=layer) as handle:
            model(**inputs)
        with vtprune.pruned(model, "divprune", keep=3, layer=layer) as plain:
            model(**inputs)
    assert counting.groups == [3]
    assert [image.kept.tolist() for image in handle.last_record.images] == [
        image.kept.tolist() for image in plain.last_record.images
    ]
    assert handle.last_record.selection_seconds > 0


def test_groups_are_runs_of_consecutive_same_sized_images_so_strategies_see_batch_order():
    counting = Counting()
    sizes = [8, 8, 12, 8, 2, 8]  # the 2-token image is kept whole (budget 2) and never reaches the strategy
    images = [TokenContext(features=torch.randn(n, 3), keep=n) for n in sizes]
    kept = select_tokens(counting, Budget(keep=2), images)
    assert counting.groups == [2, 1, 2]
    assert [k.tolist() for k in kept] == [select_tokens(DivPrune(), Budget(keep=2), [im])[0].tolist() for im in images]


def test_on_a_cpu_images_whose_context_is_a_copy_are_selected_one_at_a_time_and_released():
    # Dropped newline tokens make the strategy's context an indexed copy: one image at a time, each group's copies
    # gone before the next group's are made, bounds a batch's memory by one image's.
    features = torch.randn(8, 3)
    newline = torch.zeros(8, dtype=torch.bool)
    newline[3] = True
    images = [TokenContext(features=features, keep=8, newline=newline) for _ in range(3)]
    copies: list[weakref.ref] = []
    alive_at_each_group = []

    class Releasing(Counting):
        def order_batch(self, contexts):
            alive_at_each_group.append(sum(ref() is not None for ref in copies))
            copies.extend(weakref.ref(ctx.features) for ctx in contexts if ctx.features is not features)
            return super().order_batch(contexts)

    strategy = Releasing()
    kept = select_tokens(strategy, Budget(keep=2), images, newlines="drop")
    assert strategy.groups == [1] * 3
    assert len(copies) == 3  # each image's candidates are a copy of its tokens
    assert alive_at_each_group == [0] * 3  # no group's copies outlive it
    assert [k.tolist() for k in kept] == [
        select_tokens(DivPrune(), Budget(keep=2), [image], "drop")[0].tolist() for image in images
    ]
    strategy.groups.clear()
    select_tokens(strategy, Budget(keep=2), [TokenContext(features=features, keep=8) for _ in range(3)])
    assert strategy.groups == [3]  # all tokens are candidates: no copy, one group


def test_the_context_keeps_half_precision_inputs_in_their_dtype_and_groups_by_dtype():
    # A float32 copy of bfloat16 tokens, pre-projector features or question rows would live through the whole
    # selection (the papers' code converts for one computation); the strategy gets the tensors themselves and
    # converts where it computes, so half-precision images group like float32 ones, each dtype on its own.
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(12, 6, generator=gen)
    text = torch.randn(3, 6, generator=gen)
    pre = torch.randn(12, 5, generator=gen)
    half = {"features": features.bfloat16(), "text_embeds": text.bfloat16(), "pre_features": pre.half()}
    images = [TokenContext(keep=12, **half) for _ in range(2)]
    images += [TokenContext(features=features, keep=12, text_embeds=text, pre_features=pre) for _ in range(2)]
    seen: list[TokenContext] = []
    groups: list[int] = []

    class Recording(type(make_strategy("mmtok"))):  # reads all three inputs
        def order_batch(self, contexts):
            seen.extend(contexts)
            groups.append(len(contexts))
            return super().order_batch(contexts)

    kept = select_tokens(Recording(), Budget(keep=4), images)
    assert groups == [2, 2]
    for ctx, image in zip(seen, images, strict=True):
        for name in ("features", "text_embeds", "pre_features"):
            assert getattr(ctx, name) is getattr(image, name), name
    # The same values in float32 give the same picks: the strategy converts them itself.
    exact = TokenContext(
        features=features.bfloat16().float(),
        keep=12,
        text_embeds=text.bfloat16().float(),
        pre_features=pre.half().float(),
    )
    alone = select_tokens(make_strategy("mmtok"), Budget(keep=4), [exact])[0]
    assert [k.tolist() for k in kept[:2]] == [alone.tolist()] * 2


def test_user_greedy_strategies_implement_order_or_order_batch():
    class LastFirst(GreedyStrategy):
        def order(self, ctx):
            return torch.arange(ctx.num_tokens - 1, ctx.num_tokens - 1 - ctx.keep, -1)

    ctx = TokenContext(features=torch.randn(6, 2), keep=2)
    assert [o.tolist() for o in LastFirst().order_batch([ctx, ctx])] == [[5, 4], [5, 4]]
    assert [s.tolist() for s in LastFirst().select_batch([ctx])] == [[4, 5]]
    with pytest.raises(NotImplementedError, match="order or order_batch"):
        GreedyStrategy().order(ctx)


def test_a_strategy_that_drops_images_from_a_group_is_refused():
    class Forgetful(Strategy):
        def select_batch(self, contexts):
            return [torch.arange(ctx.keep) for ctx in contexts[1:]]

    images = [TokenContext(features=torch.randn(5, 2), keep=5) for _ in range(2)]
    with pytest.raises(VTPruneError, match="1 selections for 2 images"):
        select_tokens(Forgetful(), Budget(keep=2), images)


def test_mmtok_questions_of_other_lengths_leave_an_images_picks_alone():
    # Padding the shorter question's coverage matrix with zero rows would cover nothing, yet change the order
    # in which torch sums a column's gain; duplicate tokens (exact ties, broken by that rounding) then pick
    # otherwise in this case. Images are grouped by question length instead.
    gen = torch.Generator().manual_seed(13)
    contexts = []
    for words in (3, 17):
        centres = torch.randn(25, 32, generator=gen)
        features = centres[torch.randint(25, (100,), generator=gen)]
        text = torch.randn(words, 32, generator=gen)
        contexts.append(
            TokenContext(features=features, keep=25, text_embeds=text, pre_features=features[:, :16].contiguous())
        )
    mmtok = make_strategy("mmtok")
    assert [order.tolist() for order in mmtok.order_batch(contexts)] == [mmtok.order(ctx).tolist() for ctx in contexts]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it that compute (views launch nothing), and those that read a value back to
    the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.host_reads.append(str(func))  # .item() / int() / bool(), and shape-dependent outputs
        return func(*args, **(kwargs or {}))


@pytest.fixture
def as_on_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choices a CPU makes differently, made as on an accelerator: every strategy keeps a group of images whole
    (on a CPU ``memory_groups`` cuts it to bound the memory, and MMTok takes one image at a time), and the duplicate
    snap compares every entry (on a CPU it selects the rows that share a norm, which reads back), and MMTok evaluates
    every gain each step (on a CPU it visits only the rows a pick raises, which reads back)."""
    for module in (divprune, todre, zoo):
        monkeypatch.setattr(module, "memory_groups", lambda contexts, *_, **__: [contexts])
    monkeypatch.setattr(diversity, "compares_shared_norms_only", lambda device: False)
    monkeypatch.setattr(coverage, "updates_gains_incrementally", lambda device: False)


@pytest.mark.usefixtures("as_on_an_accelerator")
def test_mmtok_holds_a_group_s_weights_once_besides_its_loop_buffer_on_an_accelerator() -> None:
    # The dense loop reads each image's weights transposed. Written straight into that layout, a group holds its
    # (B, N, R) columns and the loop's buffer like them (2 B matrices), not also each image's (R, N) weights and a
    # stacked copy of them (4 B matrices before).
    images, n, words = 6, 160, 8
    gen = torch.Generator().manual_seed(0)
    contexts = [
        TokenContext(
            features=torch.randn(n, 64, generator=gen),
            keep=20,
            seed=seed,
            text_embeds=torch.randn(words, 64, generator=gen),
            pre_features=torch.randn(n, 32, generator=gen),
        )
        for seed in range(images)
    ]
    strategy = make_strategy("mmtok")
    peak = peak_extra_bytes(lambda: strategy.order_batch(contexts), torch.device("cpu"))
    matrices = peak / ((words + n) * n * 4)
    assert 2 * images <= matrices < 2 * images + 2, matrices


@pytest.mark.usefixtures("as_on_an_accelerator")
@pytest.mark.parametrize(("name", "options"), GREEDY, ids=[f"{n}{o}" for n, o in GREEDY])
def test_greedy_loops_run_a_fixed_number_of_ops_per_pick_and_never_read_back(name: str, options: dict) -> None:
    # What a GPU needs from a k-step loop: no host synchronisation per pick, and as many kernel launches per pick
    # for a group of images as for one. Counted as aten ops (each one launch on a GPU) for 1 and 3 images at two
    # budgets: the extra ops per extra pick must be the same constant (as_on_an_accelerator).
    strategy = make_strategy(name, **options)
    gen = torch.Generator().manual_seed(0)

    def ops(images: int, keep: int) -> int:
        contexts = []
        for seed in range(images):
            pre = torch.randn(40, 5, generator=gen)
            contexts.append(
                TokenContext(
                    features=torch.randn(40, 256, generator=gen),
                    keep=keep,
                    seed=seed,
                    text_embeds=torch.randn(3, 256, generator=gen),
                    pre_features=pre,
                    projector=projector,
                )
            )
        with OpCounter() as counter:
            strategy.order_batch(contexts)
        assert counter.host_reads == []
        return counter.ops

    per_pick = {images: (ops(images, 30) - ops(images, 10)) / 20 for images in (1, 3)}
    assert (
        per_pick[1] == per_pick[3] and per_pick[1] == int(per_pick[1]) and 0 < per_pick[1] <= OPS_PER_PICK.get(name, 8)
    ), per_pick
