"""The IST algorithm, pure and framework-agnostic: scores, samplers and the suppression update."""

from ist_ds.core.config import ISTConfig, ResolvedCounts
from ist_ds.core.importance import ImportanceState, sample_uniform_layers, sample_without_replacement

__all__ = ["ISTConfig", "ResolvedCounts", "ImportanceState", "sample_uniform_layers", "sample_without_replacement"]
