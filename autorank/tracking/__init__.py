"""Tracking stage: the MLflow mirror of a search and its live Pareto front."""

from autorank.tracking.pareto import OBJECTIVES, format_front, front_csv, front_json, pareto_front
from autorank.tracking.tracker import SearchTracker, default_tracking_uri

__all__ = ["OBJECTIVES", "SearchTracker", "default_tracking_uri", "format_front", "front_csv", "front_json",
           "pareto_front"]
