"""Measurements of what visual tokens carry: per-token information per layer.

``token_information`` removes each visual token from a decoder layer on (batched, through vtprune's own decoder
stage) and measures the change of the answer's next-token distribution.
"""

from .information import MEASURES, LeaveOut, SampleInformation, token_information

__all__ = ["MEASURES", "LeaveOut", "SampleInformation", "token_information"]
