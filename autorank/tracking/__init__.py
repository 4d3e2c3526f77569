"""Tracking stage: the MLflow mirror of a search and its live Pareto front, and MLflow servers.

`MlflowCallback` is what a caller hands `run_search(callbacks=[...])` to track a search (the CLI does).
"""

from autorank.tracking.tracker import MlflowCallback, SearchTracker

__all__ = ["MlflowCallback", "SearchTracker"]
