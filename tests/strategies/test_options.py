"""Strategy options are declared and checked when a strategy is built; a stage's string form reads back as itself.

Every option of every registered strategy is tried with NaN, inf, 0, negative and wrong-type values: each is
refused with an OptionError that names the option and the value, or accepted as its declaration says and then
selects a valid keep set.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import STRATEGIES
from contexts import assert_valid_selection, full_context

import vtprune
from vtprune.errors import OptionError, VTPruneError
from vtprune.schedule import Budget, Stage, make_stage, parse_schedule
from vtprune.strategies.base import Strategy
from vtprune.strategies.options import Option, constructor_defaults, declared_options
from vtprune.strategies.registry import make_strategy, strategy_class

EVERY = list(STRATEGIES)
OPTIONS = [(name, option) for name in EVERY for option in declared_options(strategy_class(name))]
BAD_VALUES = [math.nan, math.inf, -math.inf, 0, 0.0, -1, -0.5, 2.5, True, False, "abc", "", None, [], (1, "x")]


def test_every_builtin_option_is_declared() -> None:
    for name in EVERY:
        cls = strategy_class(name)
        assert set(constructor_defaults(cls)) == set(declared_options(cls)), name
    assert {("mmtok", "alpha"), ("zoo", "step"), ("zoo", "rank"), ("todre_relevance", "tau")} <= set(OPTIONS)


@pytest.mark.parametrize(("name", "option"), OPTIONS, ids=[f"{n}.{o}" for n, o in OPTIONS])
def test_every_option_refuses_or_accepts_each_bad_value_as_declared(name: str, option: str) -> None:
    spec: Option = declared_options(strategy_class(name))[option]
    refused = accepted = 0
    for value in BAD_VALUES:
        numeric = spec.kind in (int, float) and not spec.many
        must_refuse = (
            value is not None and numeric and (isinstance(value, (bool, str, list, tuple)) or not math.isfinite(value))
        )
        try:
            strategy = make_strategy(name, **{option: value})
        except OptionError as error:
            message = str(error)
            assert f"{option}={value!r}" in message and repr(name) in message, message
            refused += 1
            continue
        assert not must_refuse, f"{name} accepted {option}={value!r}"
        stored = getattr(strategy, option)
        assert stored == spec.check(value)  # what the declaration says it means
        ctx = full_context(16, 5, 0)
        assert_valid_selection(strategy, strategy.select(ctx), ctx)
        accepted += 1
    assert refused + accepted == len(BAD_VALUES)
    assert refused >= 9  # NaN, ±inf, True, False, "abc", "", [] and (1, "x") are never a valid setting


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mmtok:25%(alpha:nan)", "alpha=nan"),
        ("mmtok:25%(text_temp:inf)", "text_temp=inf"),
        ("mmtok:25%(vision_temp:0)", "vision_temp=0"),
        ("zoo:25%(step:nan)", "step=nan"),
        ("zoo:25%(step:inf)", "step=inf"),
        ("zoo:25%(rank:0)", "rank=0"),
        ("zoo:25%(rank:-1)", "rank=-1"),
        ("zoo:25%(directions:2.5)", "directions=2.5"),
        ("zoo:25%(chunk:0)", "chunk=0"),
        ("todre_relevance(tau:nan)", "tau=nan"),
        ("todre_relevance(tau:abc)", "tau='abc'"),
        ("todre:25%(method:greedy)", "method='greedy'"),
        ("matryoshka:9(scales:576/x)", "scales='576/x'"),
    ],
)
def test_bad_options_in_schedule_strings_are_refused_when_the_schedule_is_built(spec: str, message: str) -> None:
    with pytest.raises(OptionError, match=f"^strategy '.*': option {message} is not accepted"):
        parse_schedule(spec)


def test_bad_options_are_refused_before_the_model_is_touched(models) -> None:
    model = models("llava")
    for call in (
        lambda: vtprune.prune(model, "zoo:4(directions:2.5)"),
        lambda: vtprune.prune(model, "zoo", keep=4, step=float("nan")),
        lambda: vtprune.prune(model, "mmtok", keep_ratio=0.25, alpha=float("inf")),
    ):
        with pytest.raises(OptionError):
            call()
        assert not hasattr(model, "_vtprune_handle") and not model._forward_pre_hooks


def test_options_are_checked_on_the_instance_too() -> None:
    from vtprune.strategies import MMTok, ZOOPrune

    with pytest.raises(OptionError, match="alpha=nan"):
        MMTok(alpha=float("nan"))
    zoo = ZOOPrune()
    with pytest.raises(OptionError, match="rank=0"):
        zoo.rank = 0
    assert zoo.rank is None


def test_unknown_options_name_what_the_strategy_takes() -> None:
    with pytest.raises(OptionError, match=r"does not take these options: \['alpha'\]; it takes \['chunk', 'dir"):
        make_strategy("zoo", alpha=1)
    assert issubclass(OptionError, VTPruneError) and issubclass(OptionError, ValueError)


# --- the string form reads back as the same stage --------------------------------------------------------------


def other_values(spec: Option, default: object) -> list:
    """Valid values of an option other than its default (tried in the round trip)."""
    if spec.choices is not None:
        candidates = list(spec.choices)
    elif spec.kind is bool:
        candidates = [True, False]
    elif spec.many:
        candidates = [(9, 1), (4,)]
    else:
        candidates = [1, 3, 17, 0.3, 0.7, 1e-05, 2.5, 1 / 3]
    valid = []
    for value in candidates:
        try:
            checked = spec.check(value)
        except OptionError:
            continue
        if checked != default and checked not in valid:
            valid.append(checked)
    return valid


def stages_of(name: str) -> list[Stage]:
    cls = strategy_class(name)
    strategy = make_strategy(name)
    layer = 2 if strategy.places == {"decoder"} and strategy.default_layer(8) is None else None
    budgets = [Budget(keep=7), Budget(keep_ratio=0.25), Budget(keep_ratio=1 / 3), Budget(keep_ratio=1e-05)]
    stages = [Stage(strategy, layer=layer, budget=budget) for budget in budgets] if strategy.needs_budget else []
    stages.append(Stage(strategy, layer=layer, budget=Budget(keep=7) if strategy.needs_budget else None))
    defaults, base = constructor_defaults(cls), stages[-1]
    for option, spec in declared_options(cls).items():
        for value in other_values(spec, defaults[option]):
            stages.append(replace_strategy(base, make_strategy(name, **{option: value})))
    return stages


def replace_strategy(stage: Stage, strategy: Strategy) -> Stage:
    # An option may decide whether the strategy takes a budget (trim's adaptive count).
    return Stage(strategy, layer=stage.layer, budget=stage.budget if strategy.needs_budget else None)


@pytest.mark.parametrize("name", EVERY)
def test_every_stage_string_reads_back_as_the_same_stage(name: str) -> None:
    stages = stages_of(name)
    with_options = 0
    for stage in stages:
        text = str(stage)
        assert parse_schedule(text).stages == [stage], text
        with_options += "(" in text
    without_options = 5 if make_strategy(name).needs_budget else 1  # the budgets at the default options
    assert with_options == len(stages) - without_options


def test_options_and_exact_ratios_survive_the_string_form() -> None:
    stage = parse_schedule("mmtok:25%(alpha:0.3)").stages[0]
    assert str(stage) == "mmtok:0.25(alpha:0.3)"
    assert stage.strategy.alpha == 0.3
    schedule = parse_schedule("zoo:0.123456789(directions:8;rank:4)+fastv@2:50%")
    assert str(schedule) == "zoo:0.123456789(directions:8;rank:4)+fastv@2:0.5"
    assert parse_schedule(str(schedule)) == schedule
    assert str(make_stage("matryoshka", keep=9, scales=[576, 144, 36, 9, 1])) == "matryoshka:9(scales:576/144/36/9/1)"
    assert str(make_stage("divprune", keep_ratio=1)) == "divprune:1.0"  # a fraction, not one token
    assert str(make_stage("divprune", keep_ratio=1e-05)) == "divprune:0.00001"


def test_a_stage_equals_only_a_stage_with_the_same_name_options_and_budget() -> None:
    assert make_stage("mmtok", keep=4, alpha=0.3) == make_stage("mmtok", keep=4, alpha=0.3)
    assert make_stage("mmtok", keep=4, alpha=0.3) != make_stage("mmtok", keep=4, alpha=0.4)
    assert make_stage("mmtok", keep=4) != make_stage("mmtok", keep=5)
    assert make_strategy("random") != make_strategy("random_deep")
    assert len({make_strategy("zoo", rank=2), make_strategy("zoo", rank=2)}) == 1


def test_parameters_match_their_declarations_in_the_signature() -> None:
    # The defaults the string form leaves out are the constructor's: each must itself be a valid value.
    for name in EVERY:
        cls = strategy_class(name)
        for option, default in constructor_defaults(cls).items():
            assert default is not inspect.Parameter.empty
            assert declared_options(cls)[option].check(default) == default


def test_option_values_are_normalised() -> None:
    assert make_strategy("mmtok", alpha=1).alpha == 1.0 and isinstance(make_strategy("mmtok", alpha=1).alpha, float)
    assert make_strategy("matryoshka", scales=[9, 1]).scales == (9, 1)
    assert make_strategy("zoo", rank=torch.tensor(3).item()).rank == 3
