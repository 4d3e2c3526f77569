"""Trial overhead of the search: wall time / (fine-tune + evaluation time); target <= 1.15.

Runs a real search (local executor, MLflow tracking on) and reports, per trial, the trial's wall
time (compress + fine-tune + evaluate + profile + save) over its fine-tune + evaluation time, and
for the whole loop: the time from the first trial's start to the last trial's end (so Optuna
ask/tell, pruning of weights and the MLflow/front refreshes are included) over the sum of the
trials' fine-tune + evaluation times.

    python scripts/bench_trial_overhead.py                       # small CNN on digits, default.yaml
    python scripts/bench_trial_overhead.py --model resnet20 \
        --weights ../shared/models/cifar10/resnet20-12fca82f-jpeg-adapted.pt \
        --data imagefolder:../shared/data/cifar10-jpeg.tar.gz --config search_spaces/resnet_cifar.yaml --trials 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description="trial overhead of autorank search")
    parser.add_argument("--config", type=Path, default=REPO / "search_spaces" / "default.yaml")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--weights", help="pretrained weights (default for small_cnn: trained here first)")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()

    import torch

    from autorank.data import load_data
    from autorank.engine import TrainConfig, train
    from autorank.models import create_model
    from autorank.search.run import run_search
    from autorank.tracking import MlflowCallback

    data = load_data(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            model = create_model(args.model, data)
            train(model, data, TrainConfig(steps=150, batch_size=64, lr=0.05, schedule="onecycle"))
            weights = Path(tmp) / "pretrained.pt"
            torch.save({"state_dict": model.state_dict()}, weights)
        result = run_search(args.config, args.model, weights, args.data, Path(tmp) / "search", trials=args.trials,
                            data=data, progress=False, callbacks=[MlflowCallback()])
        trials = [t for t in result.trials if t.finished_ok]
        print(f"{args.model} on {args.data}, {args.config.name}, {len(trials)} trials, torch threads "
              f"{torch.get_num_threads()}")
        print(f"{'trial':>5} {'compress_s':>10} {'train_s':>8} {'eval_s':>7} {'wall_s':>7} {'overhead':>8}")
        ratios = []
        for t in trials:
            m = t.metrics
            ratio = m["wall_s"] / (m["train_s"] + m["eval_s"])
            ratios.append(ratio)
            print(f"{t.number:>5} {m['compress_s']:>10.2f} {m['train_s']:>8.2f} {m['eval_s']:>7.2f} "
                  f"{m['wall_s']:>7.2f} {ratio:>8.3f}")
        work = sum(t.metrics["train_s"] + t.metrics["eval_s"] for t in trials)
        loop = max(t.finished for t in trials) - min(t.started for t in trials)
        print(f"per-trial overhead: median {statistics.median(ratios):.3f}, max {max(ratios):.3f}")
        print(f"whole loop: {loop:.1f} s for {work:.1f} s of fine-tune + eval -> overhead {loop / work:.3f} "
              f"(target <= 1.15)")
    return 0


if __name__ == "__main__":
    start = time.time()
    code = main()
    print(f"bench wall time {time.time() - start:.0f} s", file=sys.stderr)
    sys.exit(code)
