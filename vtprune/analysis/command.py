"""``vtprune horizon``: measure token information per layer on the toy data, find the horizon, rate the strategies.

Prints the per-layer table (mean information relative to the first layer, uniformity, ROC AUC per strategy), the
horizon and the schedule it suggests, saves the result (JSON, readable by ``random_deep:<ratio>(horizon:<file>)``) and
draws the curves (PNG, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..strategies.base import INPUT_PLACE
from ..strategies.registry import strategy_class
from .horizon import RULES, Horizon, horizon
from .information import MEASURES, token_information
from .quality import ScoreQuality, score_quality

DEFAULT_STRATEGIES = ("divprune", "fastv", "mmtok", "todre")


def add_horizon_command(commands: Any) -> None:
    """Register ``horizon`` on the ``vtprune`` command's subparsers."""
    from ..toyvlm.data import TEST_SEED
    from ..toyvlm.tasks import TASKS

    parser = commands.add_parser(
        "horizon",
        help="measure what visual tokens carry per decoder layer; find the information horizon",
        description="Removes each visual token from each decoder layer on (batched leave-one-out) on toy-data "
        "questions, prints per-layer information, uniformity and each strategy's ROC AUC, the horizon and a schedule.",
    )
    parser.add_argument("--task", choices=list(TASKS), default="shapes", help="the toy task whose questions to use")
    parser.add_argument(
        "--model", default=None, help="folder of a saved toy VLM (default: the task's toy LLaVA in vtprune/assets)"
    )
    parser.add_argument("--samples", type=int, default=8, help="questions of the toy test split to measure on")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="decoder layers (default: all)")
    parser.add_argument("--tokens", type=int, default=None, help="measure a random subset of this many tokens")
    parser.add_argument("--group", type=int, default=72, help="removals per forward (batch rows)")
    parser.add_argument("--measure", choices=MEASURES, default="kl")
    parser.add_argument("--rule", choices=RULES, default="fraction")
    parser.add_argument("--fraction", type=float, default=0.1, help="'fraction' rule: relative information bound")
    parser.add_argument("--uniformity", type=float, default=0.95, help="'uniform' rule: normalised entropy bound")
    parser.add_argument("--strategies", nargs="*", default=list(DEFAULT_STRATEGIES), help="strategies to rate")
    parser.add_argument("--q", type=float, default=0.1, help="share of tokens counted as informative for the AUC")
    parser.add_argument("--budget", default="25%", help="budget of the suggested first stage")
    parser.add_argument("--ratio", default="50%", help="share random_deep keeps in the suggested schedule")
    parser.add_argument("--out", default="horizon.json", help="JSON of the horizon and the per-layer curves")
    parser.add_argument("--plot", default="horizon.png", help="PNG of the curves ('' for none)")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="split seed (default: the test split)")
    parser.set_defaults(run=run_horizon_command)


def run_horizon_command(args: argparse.Namespace) -> None:
    from ..adapters import adapter_for
    from ..toyvlm.model import DIGITS_PATH, load_toy_model, prompt_inputs
    from ..toyvlm.tasks import TASKS

    model, processor = load_toy_model(args.model or (DIGITS_PATH if args.task == "digits" else None))
    num_layers = len(adapter_for(model).layers)
    samples = TASKS[args.task].make_split(args.seed, args.samples)
    inputs = [prompt_inputs(processor, [sample.image], [sample.question]) for sample in samples]
    start, cpu = time.perf_counter(), time.process_time()
    information = token_information(model, inputs, layers=args.layers, tokens=args.tokens, group_size=args.group)
    measured, cpu = time.perf_counter() - start, time.process_time() - cpu
    found = horizon(
        information,
        num_layers=num_layers,
        measure=args.measure,
        rule=args.rule,
        fraction=args.fraction,
        uniformity_threshold=args.uniformity,
    )
    quality = score_quality(
        model, inputs, information, args.strategies, measure=args.measure, q=args.q, tokenizer=processor
    )
    name = f"the toy {model.config.model_type} in {args.model}" if args.model else f"the {args.task} toy LLaVA"
    tokens = "all" if args.tokens is None else f"{args.tokens} random"
    print(
        f"vtprune horizon: {name} ({num_layers} decoder layers), {args.samples} test questions, {tokens} of "
        f"{information[0].num_tokens} visual tokens, measure {args.measure}; leave-one-out took {measured:.0f} s ({cpu:.0f} s of CPU time)\n"
    )
    print(format_table(found, quality))
    print()
    print(describe(found))
    print(f"suggested schedule: {suggest(found, quality, args.budget, args.ratio)}")
    if args.out:
        save(found, quality, args.out)
        print(f"result -> {args.out} (use it as random_deep:{args.ratio}(horizon:{args.out}))")
    if args.plot:
        plot(found, quality).savefig(args.plot, dpi=120)
        print(f"curves -> {args.plot}")


def format_table(found: Horizon, quality: ScoreQuality) -> str:
    """The per-layer table as markdown."""
    names = list(quality.auc)
    head = "| layer | mean information | relative | uniformity | " + " | ".join(f"AUC {n}" for n in names)
    lines = [head + " | random |", "|" + "---|" * (5 + len(names))]
    for row, layer in enumerate(found.layers):
        cells = [f"{quality.auc[n][row]:.2f}" if not math.isnan(quality.auc[n][row]) else "–" for n in names]
        mark = " ←" if layer == found.layer else ""
        lines.append(
            f"| {layer}{mark} | {found.mean[row]:.3g} ± {found.sem[row]:.2g} | {found.relative[row]:.3f} | "
            f"{found.uniformity[row]:.2f} | " + " | ".join(cells) + " | 0.50 |"
        )
    return "\n".join(lines)


def describe(found: Horizon) -> str:
    bound = (
        f"relative information <= {found.fraction:g}"
        if found.rule == "fraction"
        else f"uniformity >= {found.uniformity_threshold:g}"
    )
    if found.layer is None:
        return f"no horizon: no measured layer has {bound} from there on"
    return f"horizon: layer {found.layer} of {found.num_layers} (first layer with {bound} from there on)"


def suggest(found: Horizon, quality: ScoreQuality, budget: str, ratio: str) -> str:
    """``<strategy>:<budget>+random_deep@<horizon>:<ratio>``: the input-stage strategy whose scores predicted the
    information best before the horizon (mean AUC), then random pruning from the horizon on."""
    before = [row for row, layer in enumerate(found.layers) if found.layer is None or layer < found.layer]
    rated = {
        name: sum(quality.auc[name][row] for row in before) / len(before)
        for name in quality.auc
        if INPUT_PLACE in strategy_class(name.split("(")[0]).places and before
    }
    first = max(rated, key=rated.__getitem__) if rated else "divprune"
    schedule = f"{first}:{budget}"
    if found.layer is not None:
        schedule += f"+random_deep@{max(1, found.layer)}:{ratio}"
    return schedule


def save(found: Horizon, quality: ScoreQuality, path: str | Path) -> None:
    """The horizon (what ``random_deep:<ratio>(horizon:<file>)`` reads) with the score quality alongside."""
    found.save(path)
    data = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps({**data, "score_quality": asdict(quality)}, indent=1))


def plot(found: Horizon, quality: ScoreQuality, title: str | None = None) -> Any:
    """Two panels: relative information and uniformity per layer (horizon marked); AUC per strategy per layer."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(found.layers, found.relative, "o-", label=f"mean {found.measure} / layer {found.layers[0]}'s")
    left.plot(found.layers, found.uniformity, "s--", label="uniformity (normalised entropy)")
    right.axhline(0.5, color="grey", linestyle=":", label="random")
    for name, values in quality.auc.items():
        right.plot(found.layers, values, "o-", label=name)
    for ax in (left, right):
        if found.layer is not None:
            ax.axvline(found.layer, color="red", alpha=0.4, label=f"horizon (layer {found.layer})")
        ax.set_xlabel("decoder layer the token is removed from")
        ax.set_xticks(found.layers)
        ax.legend(fontsize=7)
    left.set_ylim(0, 1.05)
    left.set_title("information carried by a visual token", fontsize=9)
    right.set_ylim(0, 1.02)
    right.set_title(f"ROC AUC of strategy scores vs top {quality.q:.0%} informative", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
