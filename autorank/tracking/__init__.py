"""Tracking stage: the MLflow mirror of a search and its live Pareto front."""

from autorank.tracking.tracker import SearchTracker

__all__ = ["SearchTracker"]
