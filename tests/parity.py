"""The authors' reference outputs in tests/data/parity (copied from shared/parity; see its README)."""

import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "parity"


def parity_cases(method: str) -> list[dict]:
    """Every case of ``method`` ("divprune", "mmtok", "matryoshka") in parity.json."""
    return [case for case in json.loads((DATA / "parity.json").read_text())["cases"] if case["method"] == method]
