"""The digits experiments of docs/experiments.md: 10 clients, 30 rounds, the
built-in MLP (64-128-10), one local epoch per round (lr 0.5, batch 32), IID
and Dirichlet label skew (alpha 0.1, 0.5, 1.0) with FedAvg, and alpha 0.5
with FedProx and FedAdam; against the same model trained centrally for the
same 30 passes over the data. Each run in its own directory (metrics.jsonl,
metrics.csv), one chart of them all.

    .venv/bin/python examples/digits_experiments.py --out docs/experiments
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import paramserver as ps
from paramserver import results, strategies, tasks, training

ROUNDS, CLIENTS, LR = 30, 10, 0.5
RUNS = {  # name: (partition, strategy, its parameters)
    "iid": ("iid", "fedavg", {}),
    "dirichlet-1.0": ("dirichlet:1.0", "fedavg", {}),
    "dirichlet-0.5": ("dirichlet:0.5", "fedavg", {}),
    "dirichlet-0.1": ("dirichlet:0.1", "fedavg", {}),
    "dirichlet-0.5-fedprox": ("dirichlet:0.5", "fedprox", {"mu": 0.01}),
    "dirichlet-0.5-fedadam": ("dirichlet:0.5", "fedadam", {"server_lr": 0.03}),
}


def centralized(seed: int) -> float:
    """The same MLP trained on all the training data for ROUNDS epochs."""
    digits = ps.data.digits()
    torch.manual_seed(seed)
    model = training.build_model("mlp", seed, digits.features, digits.classes)
    task = ps.Task(model=lambda: model, train_data=digits.train, test_data=digits.test, lr=LR)
    for epoch in range(ROUNDS):
        task.train(model, epoch, "centralized")
    return task.evaluate(model).metrics["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="which runs (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    baseline = centralized(args.seed)
    rows = []
    for name in args.runs:
        split, strategy, parameters = RUNS[name]
        run_dir = args.out / name
        history = ps.run_experiment(
            tasks.Builtin("mlp", "digits", split, lr=LR), clients=CLIENTS, rounds=ROUNDS,
            strategy=ps_strategy(strategy, parameters), seed=args.seed, run_dir=run_dir)
        shutil.rmtree(run_dir / "state")  # the server's state: not part of the record
        accuracy = history.accuracy()
        rows.append((name, accuracy[9], accuracy[19], accuracy[-1], history.final_sha256))
    results.plot([args.out / name for name in args.runs], args.out / "digits.png",
                 title=f"digits, {CLIENTS} clients, MLP, FedAvg unless named")
    print(f"centralized, {ROUNDS} epochs: test accuracy {baseline:.4f}")
    print("| run | round 10 | round 20 | round 30 | of centralized | final model sha256 |")
    print("|---|---|---|---|---|---|")
    for name, r10, r20, r30, digest in rows:
        print(f"| {name} | {r10:.3f} | {r20:.3f} | {r30:.3f} | {r30 / baseline:.3f} | "
              f"`{digest[:16]}` |")
    (args.out / "summary.json").write_text(json.dumps(
        {"centralized": baseline, "runs": {r[0]: r[1:] for r in rows}}, indent=1))


def ps_strategy(name: str, parameters: dict[str, float]) -> strategies.Strategy:
    return strategies.build(name, parameters)


if __name__ == "__main__":
    main()
