"""Read back what an offline W&B run wrote: the records of its `run-<id>.wandb` file.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
records framed as in LevelDB's log format (32 KiB blocks; each chunk has a 7-byte header
of CRC32C, little-endian length and type FULL/FIRST/MIDDLE/LAST), each record one
`wandb_internal_pb2.Record` protobuf. The installed wandb has no Python reader of its own.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a `.wandb` file, in order."""
    data = Path(path).read_bytes()
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    offset, pending = len(FILE_HEADER), b""
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            offset += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        if offset + CHUNK_HEADER + length > len(data):  # still being written
            return
        chunk = data[offset + CHUNK_HEADER : offset + CHUNK_HEADER + length]
        offset += CHUNK_HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B run folders of a vqzoo run directory, oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def finished_records(run_folder: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a finished run. `wandb.finish()` can return before W&B's service has
    written the last records, so this waits (up to `timeout` s) for the closing exit record."""
    (log_file,) = Path(run_folder).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_records(log_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log_file} has no exit record after {timeout} s")
        time.sleep(0.2)


def summarize(run_folder: Path) -> dict[str, Any]:
    """The run record's id/project/group/name/tags, the config, every history row of a run and
    the kinds of its records in order (e.g. `preempting`, `exit`)."""
    out: dict[str, Any] = {"config": {}, "history": [], "kinds": []}
    for record in finished_records(run_folder):
        kind = record.WhichOneof("record_type")
        out["kinds"].append(kind)
        if kind == "run":
            run = record.run
            out |= {
                "id": run.run_id,
                "project": run.project,
                "group": run.run_group,
                "name": run.display_name,
                "tags": list(run.tags),
            }
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
    return out
