"""The authors' reference outputs in tests/data/parity (copied from shared/parity; see its README), and the
papers' formulations the selection benchmark times (eval/paper_selectors.py)."""

import importlib.util
import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "parity"

_spec = importlib.util.spec_from_file_location(
    "paper_selectors", Path(__file__).parents[1] / "eval" / "paper_selectors.py"
)
paper_selectors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_selectors)


def parity_cases(method: str) -> list[dict]:
    """Every case of ``method`` ("divprune", "mmtok", "matryoshka") in parity.json."""
    return [case for case in json.loads((DATA / "parity.json").read_text())["cases"] if case["method"] == method]
