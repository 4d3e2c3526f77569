"""Tracking stage: the MLflow mirror of a search and its live Pareto front."""

from autorank.tracking.pareto import format_front, pareto_front
from autorank.tracking.tracker import SearchTracker

__all__ = ["SearchTracker", "format_front", "pareto_front"]
