"""Search stage: YAML spaces -> Optuna study seeded by EVBMF -> trials (local or Ray) -> the front.

Public verbs: `load_space(path)`, `run_search(...)`, `load_search(out_dir)`, `best_trial(search, ...)`,
`rebuild_trial(out_dir, trial=...)`, `run_demo(out_dir)`.
"""

from autorank.records import TrialRecord
from autorank.search.results import RebuiltTrial, SearchRecord, best_trial, load_search, rebuild_trial
from autorank.search.space import SearchSpace, load_space

__all__ = ["RebuiltTrial", "SearchRecord", "SearchResult", "SearchSpace", "TrialRecord", "best_trial", "load_search",
           "load_space", "rebuild_trial", "run_demo", "run_search"]


def __getattr__(name: str):
    # run_search pulls in torch, the compression core and the executors: import it on first use so
    # that `autorank best` and space validation stay light.
    if name in ("run_search", "SearchResult"):
        from autorank.search import run

        return getattr(run, name)
    if name == "run_demo":
        from autorank.search.demo import run_demo

        return run_demo
    raise AttributeError(name)
