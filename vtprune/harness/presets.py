"""Named settings from ``configs/*.yaml``: the papers' standard budgets and schedules.

A preset file has a ``description`` and ``schedules`` (schedule strings); entries that contain
``{budget}`` are expanded over the file's ``budgets`` (token counts or percentages), in order. A
preset with one schedule can also be used where a single run is meant (``--model_args preset=…``).
Names are looked up in ``$VTPRUNE_CONFIGS`` and then in the repository's ``configs/`` folder; a path
to a YAML file works too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..schedule import Schedule, parse_schedule

#: The repository's presets (present in a source checkout and an editable install).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    schedules: tuple[str, ...]


def _folders() -> list[Path]:
    extra = os.environ.get("VTPRUNE_CONFIGS")
    return ([Path(extra)] if extra else []) + [CONFIGS]


def preset_names() -> list[str]:
    """Names of the presets found on the search path."""
    return sorted({path.stem for folder in _folders() if folder.is_dir() for path in folder.glob("*.yaml")})


def load_preset(name: str) -> Preset:
    """The preset called ``name`` (or stored at the path ``name``), with its schedules expanded."""
    import yaml  # an eval dependency (lmms-eval brings it); the core package does not need it

    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = next((folder / f"{name}.yaml" for folder in _folders() if (folder / f"{name}.yaml").exists()), path)
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names()) or 'none found'}")
    data = yaml.safe_load(path.read_text()) or {}
    templates = data.get("schedules") or []
    budgets = [str(b) for b in data.get("budgets", [])]
    schedules: list[str] = []
    for template in templates:
        if "{budget}" in template:
            if not budgets:
                raise ValueError(f"preset {path}: {template!r} needs a budgets list")
            schedules += [template.format(budget=budget) for budget in budgets]
        else:
            schedules.append(template)
    if not schedules:
        raise ValueError(f"preset {path} lists no schedules")
    for schedule in schedules:
        parse_schedule(schedule)  # a typo fails here, before any model is loaded
    return Preset(path.stem, data.get("description", ""), tuple(schedules))


def preset_schedule(name: str) -> Schedule:
    """The one schedule of a single-run preset."""
    preset = load_preset(name)
    if len(preset.schedules) != 1:
        raise ValueError(
            f"preset {name!r} is a sweep of {len(preset.schedules)} runs; run it with `vtprune sweep --preset "
            f"{name}`, or pick one run with strategy=/keep= (or a schedule string)"
        )
    return parse_schedule(preset.schedules[0])
