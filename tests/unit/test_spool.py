import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paramserver import codec
from paramserver.averaging import average_state_dicts
from paramserver.spool import Spool, SpooledUpdate, aggregate


def header(client: str, sd: dict[str, torch.Tensor], weight: int,
           round: int = 1) -> codec.UpdateHeader:
    return codec.UpdateHeader(client, round, weight, codec.spec_of(sd),
                              codec.state_dict_digest(sd), {"loss": 1.0})


def write(spool: Spool, client: str, sd: dict[str, torch.Tensor], weight: int) -> SpooledUpdate:
    writer = spool.writer(header(client, sd, weight))
    for chunk in codec.iter_chunks(codec.payload_views(sd), 1000):
        writer.write(chunk)
    writer.seal()
    return writer.commit()


@pytest.mark.parametrize("workers", [1, 4])
def test_aggregate_from_disk_equals_in_memory_average(tmp_path: Path, workers: int) -> None:
    spool = Spool(tmp_path)
    sds = {f"c{i}": (i + 2, {"w": torch.randn(50, 7), "b": torch.randn(7).half(),
                             "n": torch.tensor(i)}) for i in range(4)}
    updates = [write(spool, c, sd, w) for c, (w, sd) in sorted(sds.items())]
    specs = codec.spec_of(sds["c0"][1])
    payload = aggregate(specs, updates, block_bytes=64, workers=workers)  # many blocks
    assert codec.payload_digest([payload]) == codec.state_dict_digest(average_state_dicts(sds))


def test_discard_leaves_nothing_and_commit_is_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    sd = {"w": torch.arange(4.0)}
    writer = spool.writer(header("c1", sd, 2, round=3))
    writer.write(b"partial")
    writer.discard()
    assert list((tmp_path / "round-00000003").iterdir()) == []
    writer = spool.writer(header("c1", sd, 2, round=3))
    writer.write(b"".join(codec.payload_views(sd)))
    writer.seal()
    committed = writer.commit()
    writer.discard()  # after commit: a no-op
    assert spool.load_round(3, codec.spec_of(sd)) == [committed]
    spool.drop_round(3)
    assert not (tmp_path / "round-00000003").exists()


def test_rounds_are_synced_and_dropped_whether_or_not_they_exist(tmp_path: Path) -> None:
    spool = Spool(tmp_path, durable=True)
    sd = {"w": torch.arange(4.0)}
    writer = spool.writer(header("c1", sd, 2, round=5))
    writer.write(b"".join(codec.payload_views(sd)))
    writer.seal()
    writer.commit()
    spool.sync_round(5)
    assert (tmp_path / "round-00000005" / "c1.update").exists()
    spool.drop_round(5)
    assert not (tmp_path / "round-00000005").exists()
    spool.sync_round(5)  # gone: nothing to make durable, and no error
    spool.drop_round(5)


def test_load_round_drops_corrupt_and_partial_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    sd = {"w": torch.arange(4.0)}
    good = write(spool, "good", sd, 1)
    bad = write(spool, "bad", sd, 1)
    data = bytearray(bad.path.read_bytes())
    data[-1] ^= 0xFF
    bad.path.write_bytes(bytes(data))
    partial = spool.writer(header("partial", sd, 1))
    partial.write(b"xx")
    partial.seal()  # never committed: a crash before the rename
    assert spool.load_round(1, codec.spec_of(sd)) == [good]
    assert sorted(p.name for p in spool.round_dir(1).iterdir()) == ["good.update"]


_PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
import torch
from paramserver import codec
from paramserver.spool import SpooledUpdate, aggregate
root, clients = Path(sys.argv[1]), int(sys.argv[2])
specs = (codec.TensorSpec("w", torch.float32, (2048, 2048)),)
updates = [SpooledUpdate(root / f"c{i:03d}.update", 0, codec.UpdateHeader(
    f"c{i:03d}", 1, i + 1, specs, bytes(32))) for i in range(clients)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
payload = aggregate(specs, updates)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.timeout(180)
def test_aggregation_memory_does_not_grow_with_clients(tmp_path: Path) -> None:
    # 16 MiB model. Holding every update in memory, as Flower does, would add
    # 16 MiB per client; folding from disk adds one output payload plus blocks.
    model = codec.TensorSpec("w", torch.float32, (2048, 2048))
    data = b"".join(codec.payload_views({"w": torch.randn(model.shape)}))
    for i in range(24):
        (tmp_path / f"c{i:03d}.update").write_bytes(data)
    growth = {}
    for clients in (2, 24):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(clients)],
                             capture_output=True, text=True, check=True, timeout=150)
        growth[clients] = int(out.stdout.split()[-1])
    assert growth[24] < growth[2] + model.nbytes // 2, growth
