from pathlib import Path

import torch

from paramserver import codec
from paramserver.averaging import average_state_dicts
from paramserver.spool import Spool, SpooledUpdate, aggregate


def write(spool: Spool, client: str, sd: dict[str, torch.Tensor], weight: int) -> SpooledUpdate:
    writer = spool.writer(1, client)
    for chunk in codec.iter_chunks(codec.payload_views(sd), 1000):
        writer.write(chunk)
    writer.seal()
    return SpooledUpdate(writer.commit(), weight)


def test_aggregate_from_disk_equals_in_memory_average(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    sds = {f"c{i}": (i + 2, {"w": torch.randn(50, 7), "b": torch.randn(7).half(),
                             "n": torch.tensor(i)}) for i in range(4)}
    updates = [write(spool, c, sd, w) for c, (w, sd) in sorted(sds.items())]
    specs = codec.spec_of(sds["c0"][1])
    payload = aggregate(specs, updates, block_bytes=64)  # many blocks per tensor
    assert codec.payload_digest([payload]) == codec.state_dict_digest(average_state_dicts(sds))


def test_discard_leaves_nothing_and_commit_is_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    writer = spool.writer(3, "c1")
    writer.write(b"partial")
    writer.discard()
    assert list((tmp_path / "round-00000003").iterdir()) == []
    writer = spool.writer(3, "c1")
    writer.write(b"whole")
    writer.seal()
    path = writer.commit()
    writer.discard()  # after commit: a no-op
    assert path.read_bytes() == b"whole"
    spool.drop_round(3)
    assert not (tmp_path / "round-00000003").exists()
