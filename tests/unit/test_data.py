"""Datasets without downloads: the digits' fixed split, the IDX format (files
the tests write), and clear errors for what is missing or malformed."""

from pathlib import Path

import pytest
import torch

from paramserver import data
from paramserver.data import DataError


def test_the_digits_have_a_fixed_test_split() -> None:
    first, again = data.digits(), data.digits()
    assert (len(first.train), len(first.test)) == (1437, 360)
    assert (first.features, first.classes) == (64, 10)
    assert torch.equal(first.test.tensors[0], again.test.tensors[0])
    assert float(first.train.tensors[0].max()) <= 1.0
    assert set(first.train_labels.tolist()) == set(range(10))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_round_trip(tmp_path: Path, suffix: str) -> None:
    for values in (torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8),
                   torch.tensor([7, -3, 100000], dtype=torch.int32),
                   torch.tensor([[1.5, -2.25]], dtype=torch.float32)):
        path = tmp_path / f"x{values.dtype}{suffix}"
        data.write_idx(path, values)
        assert torch.equal(data.read_idx(path), values)


def write_mnist(directory: Path, train: int = 12, test: int = 5, gz: bool = True) -> None:
    generator = torch.Generator().manual_seed(0)
    suffix = ".gz" if gz else ""
    for kind, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        data.write_idx(directory / f"{kind}-images-idx3-ubyte{suffix}", images)
        data.write_idx(directory / f"{kind}-labels-idx1-ubyte{suffix}", labels)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_is_read_from_its_idx_files(tmp_path: Path, gz: bool) -> None:
    write_mnist(tmp_path, gz=gz)
    dataset = data.load(f"mnist:{tmp_path}")
    assert (len(dataset.train), len(dataset.test), dataset.features, dataset.classes) == (
        12, 5, 784, 10)
    images, labels = dataset.train.tensors
    assert images.dtype == torch.float32
    assert float(images.max()) <= 1.0
    assert labels.tolist() == [i % 10 for i in range(12)]


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        data.mnist(tmp_path)
    broken = tmp_path / "broken"
    broken.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # says 5 values, has 2
    with pytest.raises(DataError, match="the header says 5"):
        data.read_idx(broken)
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(_write(tmp_path / "junk", b"PK\x03\x04"))
    with pytest.raises(DataError, match="unknown data"):
        data.load("cifar")


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path
