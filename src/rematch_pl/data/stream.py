"""The training stream: MMEB-train subsets mixed by weight, sharded exactly, yielding batches.

Sharding. Shard ``s = rank * num_workers + worker`` of ``S = world_size * num_workers``
keeps the rows whose global row index ``i`` (position in its subset, before caps are
counted) satisfies ``i % S == s``: one pass over all shards yields every row exactly
once. Rank and world size come from the constructor when given, else from an
initialised ``torch.distributed``, else 0 / 1; the worker from ``get_worker_info()``.

Mixing. Each subset is read through `stream_subset` (HF ``datasets`` streaming), its
shard's rows go through a seeded shuffle buffer, and a seeded RNG picks the subset of
the next example (``homogeneous=False``) or of the next whole batch
(``homogeneous=True``) with probability proportional to its weight. Default weights
are proportional to the rows each subset contributes (after caps); uniform when some
subset's size is unknown (a hub dataset without split sizes). The subset-choice RNG
depends only on ``seed`` and the epoch, not on the shard, so every rank and worker
draws the same subset sequence: with ``homogeneous=True`` the global batch of a step
comes from one subset.

Passes. Iterating the stream (``__iter__``) is infinite by default: a subset that runs out starts
its next pass at once with a new shuffle seed (its pass counter), so batches are always
full and equal across ranks. `one_pass` (or ``infinite=False``) yields one pass exactly,
with partial batches at the end, for tests and counting.

Bad rows (missing or unreadable image file, empty query or document, placeholder/image
mismatch, missing negatives, malformed negative list): ``on_bad_row="raise"`` raises a
DataError naming subset, row index and file; ``"skip"`` counts them in ``bad_rows``
(``{subset: {reason: count}}``, each row once per process however many passes skip it),
logs a warning, and attaches the new counts to the next batch (``ExampleBatch.bad_rows``)
so that they reach the main process from DataLoader workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from rematch_pl.data.images import load_image, make_processor_safe
from rematch_pl.data.mmeb import (
    TRAIN_COLUMNS,
    DataError,
    HardNegativeIndex,
    apply_target_instruction,
    content_problem,
    count_rows,
    in_row_negatives,
    is_local,
    iter_rows,
    list_subsets,
    normalize_content,
    resolve_target_instructions,
    row_file,
    select_negatives,
    stream_subset,
    target_instruction_for,
)

log = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("raise", "skip")
BAD_ROW_REASONS = ("missing image", "unreadable image", "empty query", "empty document",
                   "placeholder mismatch", "missing negatives", "bad negative list")


class ExampleBatch(list):
    """One batch of examples; ``bad_rows`` counts the rows skipped since the previous batch."""

    def __init__(self, examples=(), bad_rows: dict | None = None):
        super().__init__(examples)
        self.bad_rows = bad_rows or {}


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str, file: str | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.file = reason, detail, file


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Local shuffle: keep `size` items, emit a random one as each new item arrives."""
    if size <= 1:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else the initialised process group, else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = 0, 1
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"invalid rank {r} / world_size {w}")
    return r, w


def doc_key(text: str, image_path: str) -> int:
    """A document's identity as a signed 64-bit int: its text as the model reads it (instruction
    included) and its image file. Equal keys = the same document (`losses.false_negatives`)."""
    digest = hashlib.blake2b(f"{text}\x00{image_path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class TrainStream(IterableDataset):
    """Batches of training examples over MMEB-train-style subsets (see the module docstring).

    Each example is a dict ``subset, row_id ("<subset>:<row index>"), qry_text,
    qry_image (PIL RGB or None), pos_text, pos_image, neg_texts (list of num_hardneg),
    neg_images (list, None = no image), pos_key, neg_keys (`doc_key` of each document)``;
    images are loaded and made processor-safe here.
    """

    def __init__(self, path: str, image_root: str | None = None, subsets=None, split: str = "original", *,
                 hardneg_path: str | None = None, hardneg_image_root: str | None = None,
                 hardneg_split: str = "original", num_hardneg: int = 1, target_instruction=None,
                 batch_size: int = 8, homogeneous: bool = False, caps: Mapping | None = None,
                 weights: Mapping | None = None, seed: int = 0, shuffle_buffer: int = 256,
                 on_bad_row: str = "raise", rank: int | None = None, world_size: int | None = None,
                 infinite: bool = True, image_patch: int = 28, max_ratio: float = 200):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        if int(num_hardneg) < 0:
            raise ValueError(f"num_hardneg must be >= 0, got {num_hardneg}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = os.fspath(path)
        if image_root is None and not is_local(self.path):
            raise ValueError(f"image_root is required for the hub dataset {self.path!r}: the folder that "
                             "its relative image paths are joined to")
        self.image_root = os.fspath(image_root) if image_root is not None else self.path
        self.split = split
        self.subsets = list(subsets) if subsets else list_subsets(self.path)
        if not self.subsets:
            raise DataError(f"no subsets found in {self.path!r}")
        self.hardneg_path = os.fspath(hardneg_path) if hardneg_path else None
        self.hardneg_image_root = os.fspath(hardneg_image_root) if hardneg_image_root else self.image_root
        self.hardneg_split = hardneg_split
        self.num_hardneg = int(num_hardneg)
        self.instructions = resolve_target_instructions(target_instruction)
        self.batch_size = int(batch_size)
        self.homogeneous = bool(homogeneous)
        self.caps = self._per_subset(caps, "caps", minimum=0)
        self.seed = int(seed)
        self.shuffle_buffer_size = int(shuffle_buffer)
        self.on_bad_row = on_bad_row
        self.rank, self.world_size = rank, world_size
        if rank is not None or world_size is not None:
            resolve_rank_world(rank if rank is not None else 0, world_size if world_size is not None else 1)
        self.infinite = bool(infinite)
        self.image_patch, self.max_ratio = image_patch, max_ratio
        self.sizes = {s: self._size(s) for s in self.subsets}
        self.weights = self._resolve_weights(weights)
        self.epoch = 0
        self.bad_rows: dict[str, Counter] = {}
        self._pending_bad: dict[str, Counter] = {}
        self._bad_seen: set[tuple[str, int]] = set()
        self._hardneg: dict[str, HardNegativeIndex] = {}
        self.skip_batches = 0  # batches of this rank already consumed (exact resume)
        self._skipping = False

    # ------------------------------------------------------------------ config
    def _per_subset(self, values: Mapping | None, name: str, minimum: float) -> dict:
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.subsets))
        if unknown:
            raise ValueError(f"{name} names unknown subset(s) {unknown}; the subsets are {self.subsets}")
        for k, v in values.items():
            if v is None or float(v) < minimum or (name == "weights" and float(v) <= 0):
                raise ValueError(f"{name}[{k!r}] must be {'> 0' if name == 'weights' else '>= 0'}, got {v!r} "
                                 "(to leave a subset out, drop it from subsets)")
        return values

    def _size(self, subset: str) -> int | None:
        n = count_rows(self.path, subset, self.split)
        cap = self.caps.get(subset)
        if cap is not None:
            return int(cap) if n is None else min(n, int(cap))
        return n

    def _resolve_weights(self, weights: Mapping | None) -> dict[str, float]:
        """Sampling weight per subset; subsets without rows (e.g. capped at 0) are left out."""
        given = self._per_subset(weights, "weights", minimum=0)
        if given:
            missing = [s for s in self.subsets if s not in given]
            if missing:
                raise ValueError(f"weights given for some subsets but not for {missing}")
            out = {s: float(given[s]) for s in self.subsets}
        elif any(n is None for n in self.sizes.values()):
            out = {s: 1.0 for s in self.subsets}
        else:
            out = {s: float(n) for s, n in self.sizes.items()}
        empty = [s for s, n in self.sizes.items() if n == 0]
        if empty:
            log.info("subsets without rows (after caps) left out of the mix: %s", empty)
        out = {s: w for s, w in out.items() if s not in empty}
        if not out:
            raise DataError(f"no rows to train on in {self.path!r}: every subset of {self.subsets} is empty "
                            f"after caps {self.caps}")
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_rows(self) -> int | None:
        """Rows of one pass over all shards (None when a size is unknown)."""
        if any(n is None for n in self.sizes.values()):
            return None
        return sum(self.sizes.values())

    # ------------------------------------------------------------------ iteration
    def _shard(self, rank=None, world_size=None, worker_id=None, num_workers=None) -> tuple[int, int]:
        r, w = resolve_rank_world(rank if rank is not None else self.rank,
                                  world_size if world_size is not None else self.world_size)
        if worker_id is None:
            info = get_worker_info()
            worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"invalid worker {worker_id} of {num_workers}")
        return r * num_workers + worker_id, w * num_workers

    def __iter__(self) -> Iterator[ExampleBatch]:
        """Infinite batches (``infinite=True``, for training) or one pass (``infinite=False``).

        With ``skip_batches = n`` (resume), the first n batches of this rank are skipped: the
        DataLoader takes batch j from worker ``j % num_workers``, so worker w skips the batches
        j < n with ``j % num_workers == w``. Skipped batches are composed exactly as before
        (images are only opened, not decoded), so the stream continues where it stopped.
        """
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = int(self.skip_batches)
        # After n batches the DataLoader still starts with worker 0, but batch n belongs to
        # original worker n % num_workers: worker w continues the stream of worker (w + n) % num_workers.
        origin = (worker_id + n) % num_workers
        shard, num_shards = self._shard(worker_id=origin, num_workers=num_workers)
        own_skip = (n - origin + num_workers - 1) // num_workers if n > origin else 0
        return self._skipped(self._batches(shard, num_shards, infinite=self.infinite), own_skip)

    def _skipped(self, batches: Iterator[ExampleBatch], k: int) -> Iterator[ExampleBatch]:
        if k:
            self._skipping = True
            try:
                for _ in range(k):
                    next(batches)
            finally:
                self._skipping = False
        yield from batches

    def one_pass(self, rank: int | None = None, world_size: int | None = None, worker_id: int | None = None,
                 num_workers: int | None = None) -> Iterator[ExampleBatch]:
        """Exactly one pass over one shard (given explicitly, or as in `__iter__`); partial batches at the end."""
        shard, num_shards = self._shard(rank, world_size, worker_id, num_workers)
        return self._batches(shard, num_shards, infinite=False)

    def _batches(self, shard: int, num_shards: int, infinite: bool) -> Iterator[ExampleBatch]:
        mix = random.Random(f"{self.seed}|mix|{self.epoch}")  # same on all shards
        active = list(self.weights)  # subsets with rows
        passes = {s: 0 for s in active}
        yielded = {s: 0 for s in active}  # in the current pass
        iters = {s: self._subset_examples(s, 0, shard, num_shards) for s in active}

        def next_example(subset):
            while True:
                ex = next(iters[subset], None)
                if ex is not None:
                    yielded[subset] += 1
                    return ex
                if not infinite or yielded[subset] == 0:  # one pass done / nothing usable
                    if infinite:
                        log.warning("subset %s gives no usable rows on shard %d/%d: left out of the mix",
                                    subset, shard, num_shards)
                    return None
                passes[subset] += 1
                yielded[subset] = 0
                iters[subset] = self._subset_examples(subset, passes[subset], shard, num_shards)

        pending = []
        while active:
            subset = mix.choices(active, weights=[self.weights[s] for s in active])[0]
            if self.homogeneous:
                batch = []
                while len(batch) < self.batch_size:
                    ex = next_example(subset)
                    if ex is None:
                        active.remove(subset)
                        break
                    batch.append(ex)
                if batch:
                    yield ExampleBatch(batch, self._take_pending())
                continue
            ex = next_example(subset)
            if ex is None:
                active.remove(subset)
                continue
            pending.append(ex)
            if len(pending) == self.batch_size:
                yield ExampleBatch(pending, self._take_pending())
                pending = []
        if pending:
            yield ExampleBatch(pending, self._take_pending())
        if infinite:
            raise DataError(f"no usable training rows on shard {shard} of {num_shards} in {self.path!r} "
                            f"(bad rows: {self.bad_rows})")

    def _subset_examples(self, subset: str, pass_index: int, shard: int, num_shards: int) -> Iterator[dict]:
        cap = self.caps.get(subset)

        def own_rows():
            ds = stream_subset(self.path, subset, self.split, TRAIN_COLUMNS)
            for i, row in enumerate(iter_rows(ds)):
                if cap is not None and i >= cap:
                    return
                if i % num_shards == shard:
                    yield i, row

        rng = random.Random(f"{self.seed}|shuffle|{subset}|{self.epoch}|{pass_index}|{shard}")
        for i, row in shuffle_buffer(own_rows(), self.shuffle_buffer_size, rng):
            ex = self._example(subset, i, row)
            if ex is not None:
                yield ex

    # ------------------------------------------------------------------ examples
    def _example(self, subset: str, i: int, row: Mapping) -> dict | None:
        try:
            qry_text, qry_path = self._content(row["qry"], row["qry_image_path"], "query", self.image_root)
            pos_text, pos_path = self._content(row["pos_text"], row["pos_image_path"], "document", self.image_root)
            negs = []
            for t, p in self._negatives(subset, i, row):
                negs.append(self._content(t, p, "document", None))
            docs = [self._instructed(subset, t, p) for t, p in [(pos_text, pos_path)] + negs]
            images = [self._image(p) for p in [qry_path, pos_path] + [p for _, p in negs]]
        except _BadRow as bad:
            self._bad_row(subset, i, bad)
            return None
        keys = [doc_key(t, p) for t, p in zip(docs, [pos_path] + [p for _, p in negs])]
        return {"subset": subset, "row_id": f"{subset}:{i}", "qry_text": qry_text, "qry_image": images[0],
                "pos_text": docs[0], "pos_image": images[1], "neg_texts": docs[1:], "neg_images": images[2:],
                "pos_key": keys[0], "neg_keys": keys[1:]}

    def _content(self, text, path, role: str, root: str | None) -> tuple[str, str]:
        """(checked text, full image path or '')."""
        path = path or ""
        if path and root is not None:
            path = os.path.join(root, path)
        text = normalize_content(text, bool(path))
        problem = content_problem(text, bool(path))
        if problem == "empty":
            raise _BadRow(f"empty {role}", "no text and no image")
        if problem:
            raise _BadRow("placeholder mismatch", f"{role}: {problem}", path or None)
        return text, path

    def _instructed(self, subset: str, text: str, path: str) -> str:
        instruction = target_instruction_for(self.instructions, subset, bool(path))
        return apply_target_instruction(text, bool(path), instruction)

    def _negatives(self, subset: str, i: int, row: Mapping) -> list[tuple[str, str]]:
        """`num_hardneg` negatives with full image paths: hard-negative source first, else the row's own."""
        n = self.num_hardneg
        if n == 0:
            return []
        found = None
        if self.hardneg_path is not None:
            found = self._hardneg_index(subset).get(row)
            root = self.hardneg_image_root
        if found is None:
            try:
                found = in_row_negatives(row, f"{subset} row {i}")
            except DataError as e:
                raise _BadRow("bad negative list", str(e)) from e
            root = self.image_root
        found = [(t, os.path.join(root, p) if p else "") for t, p in found]
        positive = (row["pos_text"] or "", os.path.join(self.image_root, row["pos_image_path"])
                    if row["pos_image_path"] else "")
        chosen = select_negatives(found, n, positive)
        if len(chosen) < n:
            source = self.hardneg_path or "none (in-row neg_text/neg_image_path)"
            raise _BadRow("missing negatives", f"needs {n} negative(s), found {len(chosen)} usable; hard-negative "
                          f"source: {source}. Give data.hardneg.path or lower num_hardneg (0 = in-batch only)")
        return chosen

    def _hardneg_index(self, subset: str) -> HardNegativeIndex:
        if subset not in self._hardneg:
            self._hardneg[subset] = HardNegativeIndex.load(self.hardneg_path, subset, self.hardneg_split)
        return self._hardneg[subset]

    def _image(self, path: str):
        if not path:
            return None
        if not os.path.isfile(path):
            raise _BadRow("missing image", "no such file", path)
        if self._skipping:  # fast-forward on resume: header check only, no decoding
            try:
                with Image.open(path) as im:
                    im.size  # noqa: B018
                return None
            except Exception as e:
                raise _BadRow("unreadable image", f"{type(e).__name__}: {e}", path) from e
        try:
            return make_processor_safe(load_image(path), self.image_patch, self.max_ratio)
        except Exception as e:  # decoders raise all sorts: OSError, ValueError, SyntaxError, ...
            raise _BadRow("unreadable image", f"{type(e).__name__}: {e}", path) from e

    # ------------------------------------------------------------------ bad rows
    def _bad_row(self, subset: str, i: int, bad: _BadRow) -> None:
        file = bad.file or row_file(self.path, subset, self.split, i)
        msg = f"bad row: subset {subset!r} row {i}: {bad.reason}: {bad.detail} (file: {file})"
        if self.on_bad_row == "raise":
            raise DataError(msg + ". Fix or remove the row, or set on_bad_row='skip' to skip and count bad rows.")
        if (subset, i) in self._bad_seen:  # a later pass over the same row: counted once
            return
        self._bad_seen.add((subset, i))
        counts = self.bad_rows.setdefault(subset, Counter())
        counts[bad.reason] += 1
        self._pending_bad.setdefault(subset, Counter())[bad.reason] += 1
        n = counts[bad.reason]
        if n <= 3 or n & (n - 1) == 0:  # the first few, then at powers of two
            log.warning("%s [skipped; %d '%s' rows so far in %s]", msg, n, bad.reason, subset)

    def _take_pending(self) -> dict:
        out = {s: dict(c) for s, c in self._pending_bad.items() if c}
        self._pending_bad = {}
        return out
