"""Reading offline W&B run files (no network, no wandb API): run records and their config."""

import json
import struct
from pathlib import Path


def _records(path: Path):
    """Protobuf records of an offline W&B run file (leveldb-log framing, as wandb-core writes it)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def offline_wandb_runs(run_dir: Path) -> list[dict]:
    """(id, display name, group, project, config with its later updates) of each offline W&B run under a
    run directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = None
        for raw in _records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            kind = rec.WhichOneof("record_type")
            if kind == "run" and run is None:
                config = {item.key: json.loads(item.value_json) for item in rec.run.config.update}
                run = {"id": rec.run.run_id, "name": rec.run.display_name, "group": rec.run.run_group,
                       "project": rec.run.project, "config": config}
            elif kind == "config" and run is not None:  # later wandb.config updates (log_hyperparams)
                run["config"].update({item.key: json.loads(item.value_json) for item in rec.config.update})
        if run is not None:
            out.append(run)
    return out
