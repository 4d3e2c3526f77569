"""The 30-trial ResNet-20 / CIFAR-10 search of docs/SEARCH.md, then test accuracy of its front.

Equivalent CLI for the search part (run from the repository root):

    autorank search --config search_spaces/resnet_cifar.yaml --model resnet20 \
        --weights ../shared/models/cifar10/resnet20-12fca82f-jpeg-adapted.pt \
        --data imagefolder:../shared/data/cifar10-jpeg.tar.gz --trials 30 --out OUT

Selection happens on val; the members of the Pareto front over all trials (feasible or not: the
trade-off the search mapped) are then rebuilt from their saved weights (no retraining; the final
fine-tune's weights where the search ran one) and measured once on the test split, which the search
never saw.

Usage: python scripts/run_resnet20_search.py OUT [--trials 30] [--test-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt"
DATA = f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--test-only", action="store_true", help="only measure the front of a finished search")
    args = parser.parse_args()

    from autorank import engine
    from autorank.data import load_data
    from autorank.models import create_model
    from autorank.search import load_search, rebuild_trial
    from autorank.search.run import run_search
    from autorank.tracking import MlflowCallback
    from autorank.records import format_front, pareto_front

    data = load_data(DATA)
    if not args.test_only:
        start = time.time()
        run_search(REPO / "search_spaces" / "resnet_cifar.yaml", "resnet20", WEIGHTS, DATA, args.out,
                   trials=args.trials, resume=(args.out / "search.json").exists(), data=data,
                   callbacks=[MlflowCallback()])
        print(f"search wall time: {(time.time() - start) / 60:.1f} min", flush=True)

    search = load_search(args.out)
    feasible = pareto_front(search.trials, search.space.objectives)
    # every trial, feasible or not: the accuracy-versus-size trade-off the search mapped out
    front = pareto_front(search.trials, search.space.objectives, feasible_only=False)
    done = [t for t in search.trials if t.counted]
    print(f"{len(done)} trials ({sum(t.state == 'failed' for t in done)} failed), "
          f"{sum(t.feasible for t in done)} feasible; feasible front of {len(feasible)}:")
    print(format_front(feasible, search.reference))
    print(f"front over all trials ({len(front)}):")
    print(format_front(front, search.reference))
    reference_test = engine.evaluate(create_model("resnet20", data, WEIGHTS), data, "test")
    rows = [{"trial": "pretrained (no fine-tune)", "test_accuracy": reference_test}]
    for t in front:
        model = rebuild_trial(args.out, trial=t.number).model
        rows.append({"trial": t.number, "summary": t.summary, "feasible": t.feasible, "final": t.finalized,
                     "val_accuracy": t.figures["accuracy"], "test_accuracy": engine.evaluate(model, data, "test"),
                     "size_bytes": t.figures["size_bytes"], "ratio": t.figures["ratio"], "macs": t.figures["macs"]})
    print("| trial | feasible | plan | val acc | test acc | size | ratio | MMACs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        print(f"| {r['trial']} | {'yes' if r['feasible'] else 'no'} | {r['summary']} | {r['val_accuracy'] * 100:.2f}% | "
              f"{r['test_accuracy'] * 100:.2f}% | "
              f"{r['size_bytes'] / 1e3:.1f} KB | {r['ratio']:.1f}x | {r['macs'] / 1e6:.1f} |")
    print(f"uncompressed adapted ResNet-20: test {reference_test * 100:.2f}%, "
          f"val after the same fine-tune {search.reference['accuracy'] * 100:.2f}%, "
          f"{search.reference['size_bytes'] / 1e3:.1f} KB")
    (args.out / "front_test.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
