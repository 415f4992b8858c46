"""Datasets that need no download: scikit-learn's handwritten digits (1,797
real 8x8 images that ship with scikit-learn), MNIST and Fashion-MNIST read
from their IDX files in a local directory, and generated data (a random
linear "teacher" labels Gaussian inputs) for the benchmarks.

Every dataset is a pair of TensorDatasets (train, test) of float32 inputs
(flattened, scaled to [0, 1]) and int64 labels, with a fixed test split.
Imports torch (and scikit-learn for the digits, only when asked for them).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

# The digits' test split: this many examples, drawn once with this seed.
DIGITS_TEST = 360
DIGITS_SPLIT_SEED = 20261201


class DataError(ValueError):
    """A dataset that cannot be loaded (missing files, bad IDX, no scikit-learn)."""


@dataclass(frozen=True)
class Dataset:
    """A train/test pair and its shape: `features` per input, `classes` labels."""

    name: str
    train: TensorDataset
    test: TensorDataset
    features: int
    classes: int

    @property
    def train_labels(self) -> torch.Tensor:
        labels: torch.Tensor = self.train.tensors[1]
        return labels


def digits() -> Dataset:
    """scikit-learn's handwritten digits: 1,797 8x8 images, 10 classes; a
    fixed test split of 360. Raises DataError without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits need scikit-learn: pip install 'paramserver[data]'") from None
    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
    return Dataset("digits", TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]),
                   64, 10)


# The file names of the MNIST family (Fashion-MNIST uses the same).
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def mnist(directory: Path, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from `directory`: the four IDX files under their
    usual names, each raw or gzipped (".gz"). Raises DataError naming what is
    missing or malformed."""
    parts = {key: read_idx(_find(directory, stem)) for key, stem in IDX_FILES.items()}
    for kind in ("train", "test"):
        images, labels = parts[f"{kind}_images"], parts[f"{kind}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise DataError(f"{directory}: {kind} images {list(images.shape)} and labels "
                            f"{list(labels.shape)} do not match")
    features = parts["train_images"][0].numel()

    def split(kind: str) -> TensorDataset:
        images = parts[f"{kind}_images"].reshape(len(parts[f"{kind}_images"]), -1)
        return TensorDataset(images.to(torch.float32) / 255.0,
                             parts[f"{kind}_labels"].to(torch.int64))

    classes = int(parts["train_labels"].max().item()) + 1
    return Dataset(name, split("train"), split("test"), features, classes)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: no {stem} (or {stem}.gz)")


# IDX type codes (the third byte of the magic number) -> (dtype, bytes).
_IDX_TYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
              0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (LeCun's format: big-endian magic 0x0000TTNN, NN dims of
    uint32, then the values big-endian). Raises DataError if it is not one."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, gzip.BadGzipFile, EOFError) as error:
        raise DataError(f"{path}: {error}") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file")
    dtype, size = _IDX_TYPES[raw[2]]
    dims = raw[3]
    if len(raw) < 4 + 4 * dims:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    count = 1
    for d in shape:
        count *= d
    body = raw[4 + 4 * dims:]
    if len(body) != count * size:
        raise DataError(f"{path}: {len(body)} bytes of values, the header says {count * size}")
    values = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    if size > 1:  # big-endian on the disk, little-endian here
        values = values.reshape(-1, size).flip(1).reshape(-1)
    return values.view(dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)


def write_idx(path: Path, values: torch.Tensor) -> None:
    """Writes `values` as an IDX file (gzipped if the name ends in .gz): for
    tests and for converting data."""
    codes = {dtype: code for code, (dtype, _) in _IDX_TYPES.items()}
    header = bytes([0, 0, codes[values.dtype], values.dim()])
    header += struct.pack(f">{values.dim()}I", *values.shape)
    raw = values.contiguous().reshape(-1).view(torch.uint8)
    if values.element_size() > 1:
        raw = raw.reshape(-1, values.element_size()).flip(1).reshape(-1)
    data = header + bytes(raw.tolist())
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def subset(dataset: TensorDataset, indices: Sequence[int]) -> TensorDataset:
    """The rows `indices` of a TensorDataset (a client's part, say)."""
    index = torch.tensor(list(indices), dtype=torch.long)
    return TensorDataset(*(t[index] for t in dataset.tensors))


def generated(seed: int, examples: int, features: int = 784, classes: int = 10,
              test_examples: int = 2000) -> Dataset:
    """Gaussian inputs labelled by a random linear teacher (seeded): learnable,
    any size, no download; for the benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(features, classes, generator=generator) * 0.3
    bias = torch.randn(classes, generator=generator) * 0.3

    def draw(n: int) -> TensorDataset:
        x = torch.randn(n, features, generator=generator)
        return TensorDataset(x, (x @ teacher + bias).argmax(dim=1))

    return Dataset("generated", draw(examples), draw(test_examples), features, classes)


def load(spec: str, seed: int = 0, examples: int = 2000) -> Dataset:
    """`digits`, `mnist:DIR`, `fashion:DIR` or `generated`. Raises DataError."""
    kind, _, where = spec.partition(":")
    if kind == "digits" and not where:
        return digits()
    if kind in ("mnist", "fashion") and where:
        return mnist(Path(where), "fashion-mnist" if kind == "fashion" else "mnist")
    if kind == "generated" and not where:
        return generated(seed, examples)
    raise DataError(f"unknown data {spec!r}: use digits, mnist:DIR, fashion:DIR or generated")
