"""Read back what an offline W&B run logged, from its `.wandb` transaction log (LevelDB log format)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK, _HEADER = 32768, 7
_FULL, _LAST = 1, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def history(run_dir: Path) -> list[dict]:
    """Every `wandb.log` row of an offline run folder (`wandb/offline-run-*`)."""
    (log,) = Path(run_dir).glob("*.wandb")
    rows = []
    for record in records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def config(run_dir: Path) -> dict:
    """The run's config, merged over all config records."""
    (log,) = Path(run_dir).glob("*.wandb")
    merged: dict = {}
    for record in records(log):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged


def run(run_dir: Path) -> dict:
    """The run's name, group and project, from its run record."""
    (log,) = Path(run_dir).glob("*.wandb")
    for record in records(log):
        if record.WhichOneof("record_type") == "run":
            return {"name": record.run.display_name, "group": record.run.run_group, "project": record.run.project}
    raise AssertionError(f"{log} holds no run record")
