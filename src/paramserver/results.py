"""What a run leaves behind, in standard formats: a PNG of loss and accuracy
against rounds for one run or several side by side (`paramserver plot`), and
a global model exported as safetensors (with its round, digest and run in the
metadata) and as a state_dict that `torch.load(path, weights_only=True)`
reads (`paramserver export`).

Export reads a state dir without taking its lock (a running server keeps
serving) and never writes into it.

Imports torch, safetensors, matplotlib (plot only), state; no grpc.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from paramserver import codec
from paramserver.errors import ParamServerError
from paramserver.state import MODEL_FILE, PREVIOUS_MODEL_FILE, RUN_FILE, StoredModel, parse_model


class ResultsError(ParamServerError):
    """A path that is not what the command needs (no state dir, no run dir)."""


# -- export ----------------------------------------------------------------------------


def kept_models(state_dir: Path) -> dict[int, StoredModel]:
    """The intact global models a state dir holds (the latest and the one
    before), by round. Raises ResultsError if it is not a state dir."""
    if not (state_dir / RUN_FILE).is_file():
        raise ResultsError(f"{state_dir} is not a paramserver state dir (no {RUN_FILE})")
    models: dict[int, StoredModel] = {}
    for name in (MODEL_FILE, PREVIOUS_MODEL_FILE):
        path = state_dir / name
        try:
            stored = parse_model(path.read_bytes())
        except (OSError, ParamServerError):
            continue  # absent, or corrupt: the server would not use it either
        models.setdefault(stored.header.round, stored)
    return models


def export(state_dir: Path, out: Path, round: int | None = None) -> list[Path]:
    """Writes the global model of `round` (default: the latest) as
    OUT.safetensors and OUT.pt (or only the one OUT's extension names).
    Returns the files written. Raises ResultsError."""
    models = kept_models(state_dir)
    if not models:
        raise ResultsError(f"{state_dir} holds no global model yet")
    chosen = max(models) if round is None else round
    if chosen not in models:
        raise ResultsError(f"{state_dir} keeps the models of rounds "
                           f"{', '.join(map(str, sorted(models)))}, not {chosen}")
    stored = models[chosen]
    state = {name: tensor.clone() for name, tensor in
             codec.state_dict_from_payload(stored.header.specs, stored.payload).items()}
    # safetensors keeps tensors sorted by name: "tensors" gives the model's
    # order, in which the payload (and so the digest) is laid out.
    metadata = {"round": str(stored.header.round), "sha256": stored.header.sha256.hex(),
                "run": (state_dir / RUN_FILE).read_text(), "format": "paramserver global model",
                "tensors": json.dumps(list(state))}
    targets = _targets(out)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".pt":
            torch.save(state, target)
        else:
            from safetensors.torch import save_file

            save_file(state, str(target), metadata=metadata)
    return targets


def _targets(out: Path) -> list[Path]:
    if out.suffix in (".pt", ".safetensors"):
        return [out]
    return [out.with_name(out.name + ".safetensors"), out.with_name(out.name + ".pt")]


# -- plot --------------------------------------------------------------------------------


METRICS_FILE = "metrics.jsonl"


def read_runs(run_dirs: Sequence[Path]) -> dict[str, list[dict[str, object]]]:
    """Each run's records (metrics.jsonl, or any *.jsonl round log given
    directly). Raises ResultsError for a path that holds none."""
    runs = {}
    for path in run_dirs:
        file = path if path.is_file() else path / METRICS_FILE
        if not file.is_file():
            raise ResultsError(f"{path} is not a run directory (no {METRICS_FILE})")
        runs[str(path)] = [json.loads(line) for line in file.read_text().splitlines() if line]
    return runs


def plot(run_dirs: Sequence[Path], out: Path, title: str | None = None) -> Path:
    """Loss (training and test) and accuracy (test; federated evaluation
    dashed) against rounds, one colour per run. Raises ResultsError."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = read_runs(run_dirs)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, records) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        label = Path(name).name or name
        rounds = [r for r in records if r.get("kind") != "evaluation"]
        evaluations = [r for r in records if r.get("kind") == "evaluation"]
        _line(loss_axis, rounds, "loss", colour, f"{label} train", "-")
        _line(loss_axis, rounds, "eval_loss", colour, f"{label} test", "--")
        _line(accuracy_axis, rounds, "eval_accuracy", colour, f"{label} test", "-")
        _line(accuracy_axis, evaluations, "accuracy", colour, f"{label} federated", ":")
    loss_axis.set(xlabel="round", ylabel="loss", title="loss")
    accuracy_axis.set(xlabel="round", ylabel="accuracy", title="accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _line(axis: object, records: list[dict[str, object]], key: str, colour: str, label: str,
          style: str) -> None:
    points = [(r["round"], r["metrics"][key]) for r in records  # type: ignore[index]
              if key in r.get("metrics", {})]  # type: ignore[operator]
    if points:
        xs, ys = zip(*points, strict=True)
        axis.plot(xs, ys, style, color=colour, label=label)  # type: ignore[attr-defined]
