"""Opening a search's study storage while another process creates it."""
import threading

import optuna

from autorank.search.results import storage_for


def test_concurrent_openers_of_a_new_sqlite_storage_all_succeed(tmp_path):
    # A reader (`autorank results`, a dashboard) may open the study while the search is creating its
    # schema; without the retry the loser's CREATE TABLE / alembic INSERT raised and crashed it.
    openers = 6
    for k in range(5):
        url = f"sqlite:///{tmp_path / f'study{k}.db'}"
        start = threading.Barrier(openers)
        storages, errors = [], []

        def open_storage():
            start.wait()
            try:
                storages.append(storage_for(url))
            except Exception as exc:  # noqa: BLE001 - the test reports every failure
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_storage) for _ in range(openers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        study = optuna.create_study(study_name="s", storage=storages[0])
        study.enqueue_trial({"x": 1.0})
        assert all(len(optuna.load_study(study_name="s", storage=s).trials) == 1 for s in storages)
