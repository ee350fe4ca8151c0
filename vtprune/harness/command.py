"""``vtprune sweep`` on the command line (the arguments of :func:`vtprune.harness.sweep.run_sweep`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..arguments import at_least
from .presets import load_preset
from .sweep import RUNTIMES


def add_sweep_command(commands: Any) -> None:
    """Register ``sweep`` on the ``vtprune`` command's subparsers."""
    parser = commands.add_parser(
        "sweep",
        help="evaluate the unpruned baseline and strategies x budgets with lmms-eval, in one job",
        description="Runs the unpruned baseline and every schedule through lmms-eval with the same wrapper, and "
        "writes sweep.json, sweep.md and sweep.png to --output (an interrupted sweep resumes).",
    )
    parser.add_argument("--pretrained", default=None, help="local folder or hub id (default: the shipped toy VLM)")
    parser.add_argument("--tasks", nargs="+", default=["vtprune_shapes"], help="lmms-eval task names")
    parser.add_argument("--include-path", default=None, help="folder of extra lmms-eval tasks (e.g. eval/tasks)")
    parser.add_argument("--strategies", nargs="*", default=[], help="strategies (name[@layer][(options)])")
    parser.add_argument("--budgets", nargs="*", default=[], help="budgets for --strategies: tokens or N%%")
    parser.add_argument("--schedules", nargs="*", default=[], help="whole schedule strings, run as given")
    parser.add_argument("--preset", default=None, help="a named setting from configs/ (adds its schedules)")
    parser.add_argument("--output", required=True, help="folder for sweep.json, sweep.md, sweep.png")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (lmms-eval --limit)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--metric", default=None, help="headline metric (default: the first task's first)")
    parser.add_argument("--model-args", default="", help="more VTPruneLMM / backbone arguments: k=v,k=v")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="start over even if --output has a sweep")
    parser.add_argument(
        "--timing-rounds",
        type=at_least(0),
        default=3,
        help="interleaved rounds that time every schedule's prefill after the accuracy runs (0: off)",
    )
    parser.add_argument(
        "--timing-calls",
        type=at_least(1),
        default=2,
        help="generate() calls (the task's first) timed per schedule and round",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="transformers",
        help="vllm: evaluate on one vLLM engine with vtprune's pruning class (--model vtprune_vllm; --model-args go "
        "to it, e.g. max_model_len=4096; no timing pass)",
    )
    parser.set_defaults(run=run_sweep_command)


def sweep_schedules(strategies: list[str], budgets: list[str], schedules: list[str], preset: str | None) -> list[str]:
    """Every schedule a command line asks for: strategies x budgets, then explicit schedules, then the preset's."""
    if strategies and not budgets:
        raise SystemExit("--strategies needs --budgets (e.g. --budgets 64 32 or 25% 10%)")
    runs = [_with_budget(strategy, budget) for strategy in strategies for budget in budgets]
    runs += schedules
    if preset is not None:
        runs += load_preset(preset).schedules
    return runs


def _with_budget(strategy: str, budget: str) -> str:
    """``name[@layer][(options)]`` -> ``name[@layer]:budget[(options)]``."""
    head, paren, options = strategy.partition("(")
    return f"{head}:{budget}{paren}{options}"


def run_sweep_command(args: argparse.Namespace) -> None:
    try:
        from lmms_eval.utils import simple_parse_args_string
    except ImportError:
        raise SystemExit("vtprune sweep runs lmms-eval: pip install 'vtprune[eval]'") from None

    from .report import markdown_table
    from .sweep import run_sweep

    schedules = sweep_schedules(args.strategies, args.budgets, args.schedules, args.preset)
    pretrained = args.pretrained
    if pretrained is None:
        from ..toyvlm.model import DEFAULT_PATH

        pretrained = str(DEFAULT_PATH)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    runs = run_sweep(
        pretrained,
        args.tasks,
        schedules,
        args.output,
        include_path=args.include_path,
        limit=limit,
        batch_size=args.batch_size,
        model_args=simple_parse_args_string(args.model_args) if args.model_args else None,
        metric=args.metric,
        seed=args.seed,
        resume=not args.no_resume,
        timing_rounds=args.timing_rounds,
        timing_calls=args.timing_calls,
        runtime=args.runtime,
    )
    if runs:
        print(markdown_table(runs))
        print(f"\nwrote {args.output}/sweep.json, sweep.md, sweep.png")
