"""On-disk embedding cache: a rerun, or the rest of an interrupted run, encodes nothing twice.

Layout: ``<cache_dir>/<model fingerprint>/`` holds ``model.json`` (what the fingerprint was made
of, for people) and chunk files ``<time>-r<rank>-<uid>.safetensors`` with two tensors, ``key``
uint8 [n, 16] (item keys) and ``emb`` float32 [n, d]. Chunks are written atomically (temporary
name, then rename) every ``flush_every`` encoded items, so an interrupted run loses at most the
chunk in flight. Several ranks write their own chunks into the same folder.

* model fingerprint (`model_fingerprint`): base weights (content hash of small files; name, size,
  mtime and the first and last MiB of big ones; hub id + revision when not local), the trained
  weights (adapter, learnable tokens, projector: content hash), the settings that change an
  embedding (K, token sets, template, pixel range, compute dtype, attention kernel, the max_length
  items are truncated to - ``eval.max_length`` when set, else the checkpoint's -, a LoRA merged at
  load, compiled kernels; see `rematch_pl.encoder.fingerprint_settings`). Batch composition (float
  rounding only) is not part of it;
* item key (`item_key`): side (``qry`` / ``doc``, or ``any`` when both sides are the same
  function), text, and the image's identity (its path as the dataset names it, file size and
  modification time).

Embeddings are stored as float32, exactly as scored: a run served from the cache gives identical
results to the run that filled it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

KEY_BYTES = 16
_BIG = 256 * 2**20


def _hash_file(h, path: Path) -> None:
    st = path.stat()
    h.update(f"{path.name}\x00{st.st_size}\x00".encode())
    with path.open("rb") as f:
        if st.st_size <= _BIG:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:  # big weight files: size, mtime and both ends
            h.update(str(st.st_mtime_ns).encode())
            h.update(f.read(2**20))
            f.seek(-(2**20), os.SEEK_END)
            h.update(f.read(2**20))


def hash_folder(h, folder: str | Path, suffixes=(".json", ".safetensors", ".bin", ".txt", ".model", ".jinja")) -> None:
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in suffixes and ".cache" not in p.parts:
            h.update(str(p.relative_to(folder)).encode())
            _hash_file(h, p)


def model_fingerprint(settings: dict, base_dirs: list[str | Path], weight_dirs: list[str | Path]) -> str:
    """Hex digest of the settings and the model files (see module docstring)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for d in base_dirs:
        if d is not None and os.path.isdir(d):
            hash_folder(h, d)
    for d in weight_dirs:
        if d is not None and os.path.isdir(d):
            hash_folder(h, d)
    return h.hexdigest()


def image_identity(path: str | None, name: str | None = None) -> str:
    """The image part of an item key: its name in the dataset, file size and mtime."""
    if not path:
        return ""
    try:
        st = os.stat(path)
        return f"{name or path}\x00{st.st_size}\x00{st.st_mtime_ns}"
    except OSError:
        return f"{name or path}\x00missing"


def item_key(side: str, text: str, image_id: str) -> bytes:
    return hashlib.blake2b(f"{side}\x00{text}\x00{image_id}".encode(), digest_size=KEY_BYTES).digest()


class EmbeddingCache:
    """Item key -> float32 embedding, in memory and (when `root` is set) on disk."""

    def __init__(self, root: str | Path | None, fingerprint: str, meta: dict | None = None, rank: int = 0,
                 max_open: int = 8):
        self.dir = Path(root) / fingerprint if root is not None else None
        self.rank = rank
        self.mem: dict[bytes, torch.Tensor] = {}  # this process's entries (new or read)
        self.disk: dict[bytes, tuple[int, int]] = {}  # key -> (file number, row)
        self.files: list[Path] = []
        self._seen: set[str] = set()
        self._open: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._max_open = max_open
        self._pending: list[bytes] = []  # in memory, not yet written by this process
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            info = self.dir / "model.json"
            if meta is not None and not info.exists() and rank == 0:
                tmp = info.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(meta, indent=2, default=str))
                os.replace(tmp, info)
            self.scan()

    # ---------------------------------------------------------------- disk
    def scan(self) -> int:
        """Index the keys of chunk files not seen yet (other ranks', an earlier run's); returns how many."""
        if self.dir is None:
            return 0
        new = 0
        for p in sorted(self.dir.glob("*.safetensors")):
            if p.name in self._seen:
                continue
            try:
                with safe_open(str(p), framework="pt") as f:
                    keys = f.get_tensor("key")
            except Exception:  # a chunk being written by another process under its final name cannot
                continue  # happen (atomic rename); anything unreadable is skipped and re-encoded
            self._seen.add(p.name)
            fid = len(self.files)
            self.files.append(p)
            for row, k in enumerate(keys.numpy()):
                self.disk.setdefault(bytes(k), (fid, row))
                new += 1
        return new

    def _file(self, fid: int) -> torch.Tensor:
        if fid in self._open:
            self._open.move_to_end(fid)
            return self._open[fid]
        emb = load_file(str(self.files[fid]))["emb"]
        self._open[fid] = emb
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return emb

    # ---------------------------------------------------------------- access
    def __contains__(self, key: bytes) -> bool:
        return key in self.mem or key in self.disk

    def __len__(self) -> int:
        return len(set(self.mem) | set(self.disk))

    def put(self, keys: list[bytes], embs: torch.Tensor) -> None:
        embs = embs.detach().float().cpu()
        for k, e in zip(keys, embs):
            if k not in self.mem:
                self.mem[k] = e.clone()
                if self.dir is not None and k not in self.disk:
                    self._pending.append(k)

    def flush(self, rescan: bool = False) -> Path | None:
        """Write the pending entries (those not on disk yet) as one chunk; returns its path."""
        if self.dir is None or not self._pending:
            return None
        if rescan:
            self.scan()
        keys = [k for k in dict.fromkeys(self._pending) if k not in self.disk]
        self._pending = []
        if not keys:
            return None
        key_t = torch.tensor([list(k) for k in keys], dtype=torch.uint8)
        emb_t = torch.stack([self.mem[k] for k in keys]).contiguous()
        name = f"{time.time_ns()}-r{self.rank}-{uuid.uuid4().hex[:8]}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        save_file({"key": key_t, "emb": emb_t}, str(tmp))
        os.replace(tmp, self.dir / name)
        self._seen.add(name)
        fid = len(self.files)
        self.files.append(self.dir / name)
        for row, k in enumerate(keys):
            self.disk.setdefault(k, (fid, row))
        return self.dir / name

    def get(self, keys: list[bytes]) -> torch.Tensor:
        """Embeddings [n, d] (float32, CPU) of `keys`, all of which must be present."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        by_file: dict[int, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            e = self.mem.get(k)
            if e is not None:
                out[i] = e
                continue
            loc = self.disk.get(k)
            if loc is None:
                raise KeyError(f"embedding {k.hex()} is not in the cache")
            by_file.setdefault(loc[0], []).append((i, loc[1]))
        for fid, pairs in by_file.items():
            emb = self._file(fid)
            rows = torch.tensor([r for _, r in pairs])
            for (i, _), e in zip(pairs, emb[rows]):
                out[i] = e
        if not out:
            return torch.zeros(0, 0)
        return torch.stack(out)
