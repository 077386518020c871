"""Read an offline W&B run (``wandb/offline-run-*/run-ID.wandb``) back, for the tracking tests.

wandb >= 0.19 ships no Python reader of its run files (its Go core, wandb-core, reads them for
``wandb sync``), so this follows the format as wandb's own sources describe it (the docstring of
their former ``wandb/sdk/internal/datastore.py``): a 7-byte header (``:W&B``, magic 0xBEE1
little-endian, version 0), then LevelDB's log format (https://github.com/google/leveldb/blob/main/
doc/log_format.md) in 32 KiB blocks: records of checksum (uint32), length (uint16), type (uint8:
FULL 1, FIRST 2, MIDDLE 3, LAST 4) and data, the checksum being zlib's CRC-32 of the data seeded
with the CRC-32 of the type byte. Each assembled record is a ``wandb.proto.wandb_internal_pb2.Record``
protobuf message, a module wandb installs. Checksums are verified, so a misread fails loudly.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """Every Record of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path}: not a W&B run file (header {data[:7]!r})"
    pos, pending = len(HEADER), b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer: zero padding
            pos += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of a block or file
            pos += left_in_block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"{path}@{pos}: bad checksum"
        pos += 7 + length
        if kind == FULL:
            payload = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            payload, pending = pending + chunk, b""
        else:
            raise AssertionError(f"{path}@{pos}: record type {kind}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def read_run(run_dir: Path, wait_s: float = 30.0) -> dict:
    """{'id', 'history': [{'_step': ..., key: value}], 'config': {...}, 'artifacts': [names], 'exit_code'}.

    ``run.finish()`` can return before wandb's core process has written the end of the file (seen
    under load): read again until the run's exit record is there, for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _read_run_once(run_dir)
        except AssertionError:  # a record still being written
            run = None
        if run is not None and run["exit_code"] is not None:
            return run
        if time.monotonic() > deadline:
            return run if run is not None else _read_run_once(run_dir)
        time.sleep(0.2)


def _read_run_once(run_dir: Path) -> dict:
    (path,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {"history": [], "config": {}, "artifacts": [], "exit_code": None, "id": None}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # the run's start; wandb may write more run records later (updates)
            out["id"] = out["id"] or record.run.run_id or None
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            out["history"].append(row)
        elif kind == "artifact":
            out["artifacts"].append(record.artifact.name)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out
