"""Benchmark harness: vtprune as an lmms-eval model, measurements per generate(), and sweeps.

Needs the ``eval`` extra (lmms-eval). ``VTPruneLMM`` is ``--model vtprune``; :func:`run_sweep` runs
a baseline and many schedules in one job; :class:`GenerationMeter` measures any model's generate().
"""

from .flops import DecoderShape
from .meter import GenerateMeasurement, GenerationMeter, RunFailed, RunMeasurements, SampleMeasurement
from .presets import Preset, load_preset, preset_names

__all__ = [
    "DecoderShape",
    "GenerateMeasurement",
    "GenerationMeter",
    "Preset",
    "RunFailed",
    "RunMeasurements",
    "SampleMeasurement",
    "load_preset",
    "preset_names",
]
