"""The training stream: MMEB-train subsets mixed by weight, sharded exactly, yielding batches.

Sharding. Rank ``r`` of ``world_size`` keeps the rows whose global row index ``i`` (position
in its subset, before caps are counted) satisfies ``i % world_size == r``: one pass over all
ranks yields every row exactly once. Within a rank, batches (not rows) are dealt to the
DataLoader workers: every worker lays out every batch of its rank (rows, texts, keys; cheap
checks only) and loads the images of its own batches (``j % num_workers``). So a batch's rows
are a function of (seed, epoch, rank, world size, batch index) alone: they do not depend on the
number of workers, and a resumed run lays out the batches it skips without decoding an image.
Rank and world size come from the constructor when given, else from an initialised
``torch.distributed``, else 0 / 1; the worker from ``get_worker_info()``.

Mixing. Each subset is read through `stream_subset` (HF ``datasets`` streaming), its rank's
rows go through a seeded shuffle buffer, and a seeded RNG picks the subset of the next example
(``homogeneous=False``) or of the next whole batch (``homogeneous=True``) with probability
proportional to its weight. Default weights are proportional to the rows each subset
contributes (after caps); uniform when some subset's size is unknown (a hub dataset without
split sizes). The subset-choice RNG depends only on ``seed`` and the epoch, so every rank
draws the same sequence: with ``homogeneous=True`` the global batch of a step comes from one
subset, and consecutive batches are independent draws.

Passes. Iterating the stream (``__iter__``) is infinite by default: a subset that runs out starts
its next pass at once with a new shuffle seed (its pass counter), so batches are always full and
equal across ranks; a batch never holds a row twice (`_RowSequence`), unless its subset has
fewer rows on the rank than the batch needs. `one_pass` (or ``infinite=False``) yields one pass
exactly, with partial batches at the end, for tests and counting.

Bad rows (missing image file, empty query or document, placeholder/image mismatch, missing
negatives, malformed negative list, in the row or in the hard-negative source; an image that
does not decode): ``on_bad_row="raise"`` raises a DataError naming subset, row index and file;
``"skip"`` leaves the row out and reports it with the batch during whose layout or loading it
was found (``ExampleBatch.bad_rows``: ``[(subset, row index, reason)]``), so the reports reach
the main process from DataLoader workers and depend on the batch index alone: the datamodule
counts each row once and saves the rows in its checkpoints, so a resumed run's counts go on
from the checkpoint's (exact, like the batches). All but an undecodable image are found while
laying out batches, which every worker does for every batch: the worker that yields the batch
reports them (and logs a warning; ``bad_rows`` counts what this stream object reported, each
row once). An image that does not decode is found when its batch is loaded, and its row is
replaced in that batch by a spare row of the same subset (chosen by a shuffle seeded by the
batch index), so batches stay full and resume stays exact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
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
    """One batch of examples; ``bad_rows``: ``[(subset, row index, reason)]`` of the rows found bad
    while this batch was laid out or loaded."""

    def __init__(self, examples=(), bad_rows: list | None = None):
        super().__init__(examples)
        self.bad_rows = list(bad_rows or [])


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
        self.bad_rows: dict[str, Counter] = {}  # the rows this object reported: {subset: {reason: n}}
        self._found: list[tuple[str, int, str, str]] = []  # (subset, i, reason, message) since the last take
        self._bad_seen: set[tuple[str, int]] = set()  # found while laying out batches
        self._reported: set[tuple[str, int]] = set()
        self._hardneg: dict[str, HardNegativeIndex] = {}
        self.skip_batches = 0  # batches of this rank already consumed (exact resume)

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
    def __iter__(self) -> Iterator[ExampleBatch]:
        """Infinite batches (``infinite=True``, for training) or one pass (``infinite=False``) of
        this rank, from batch ``skip_batches`` on (exact resume).

        The DataLoader takes batch j from worker ``j % num_workers`` (counting from the first
        batch it asks for), so worker w yields batches ``skip_batches + w + k * num_workers``.
        Every worker lays out every batch of its rank (`_compose`: rows and texts, no image
        decoding), so a batch's rows do not depend on the number of workers, and the batches
        before ``skip_batches`` are laid out exactly as before without loading an image.
        """
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = resolve_rank_world(self.rank, self.world_size)
        return self._owned_batches(rank, world, worker_id, num_workers, int(self.skip_batches), self.infinite)

    def one_pass(self, rank: int | None = None, world_size: int | None = None, worker_id: int | None = None,
                 num_workers: int | None = None) -> Iterator[ExampleBatch]:
        """The batches of one pass that one worker of one rank yields (given explicitly, or as in
        `__iter__`); partial batches at the end."""
        rank, world = resolve_rank_world(rank if rank is not None else self.rank,
                                         world_size if world_size is not None else self.world_size)
        if worker_id is None:
            info = get_worker_info()
            worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"invalid worker {worker_id} of {num_workers}")
        return self._owned_batches(rank, world, worker_id, num_workers, 0, infinite=False)

    def _owned_batches(self, rank: int, world: int, worker: int, num_workers: int, first: int,
                       infinite: bool) -> Iterator[ExampleBatch]:
        self._found, self._bad_seen = [], set()
        for j, layout in enumerate(self._compose(rank, world, infinite)):
            found = self._found  # bad rows met while laying out batch j: every worker meets them
            self._found = []
            if j >= first and (j - first) % num_workers == worker:
                examples = self._load(j, layout, rank, world)
                found, self._found = found + self._found, []
                yield ExampleBatch(examples, self._report(found))

    def _compose(self, rank: int, world: int, infinite: bool) -> Iterator[list[tuple[str, int, dict]]]:
        """The rows of each batch of this rank, ``[(subset, row index, prepared example)]``.

        A seeded RNG, the same on every rank and worker, picks the subset of each example
        (``homogeneous=False``) or of each batch (``True``); the rows come from the subset's
        `_RowSequence` on this rank, never twice in one batch.
        """
        mix = random.Random(f"{self.seed}|mix|{self.epoch}")  # same on all ranks and workers
        active = list(self.weights)  # subsets with rows
        seqs = {s: _RowSequence(self, s, rank, world, infinite) for s in active}

        def draw() -> str:
            return mix.choices(active, weights=[self.weights[s] for s in active])[0]

        def drop(subset: str) -> None:
            active.remove(subset)
            if infinite:
                log.warning("subset %s gives no usable rows on rank %d/%d: left out of the mix", subset, rank, world)

        batch, taken = [], {}
        while active:
            subset = draw()
            want = self.batch_size if self.homogeneous else 1
            while want:
                item = seqs[subset].take(taken.setdefault(subset, set()))
                if item is None:
                    drop(subset)
                    break
                taken[subset].add(item[0])
                batch.append((subset, *item))
                want -= 1
            if batch and (len(batch) == self.batch_size or (self.homogeneous and want)):
                yield batch
                batch, taken = [], {}
        if batch:
            yield batch
        if infinite:
            raise DataError(f"no usable training rows on rank {rank} of {world} in {self.path!r} "
                            f"(bad rows: {self.bad_rows})")

    def _rank_rows(self, subset: str, pass_index, rank: int, world: int,
                   report: bool = True) -> Iterator[tuple[int, dict]]:
        """This rank's usable rows of `subset` (global row index ``i % world == rank``, before the
        cap) through a seeded shuffle buffer, as `_prepare`d examples; bad rows are reported
        (`report`), or passed over in silence."""
        cap = self.caps.get(subset)

        def own_rows():
            ds = stream_subset(self.path, subset, self.split, TRAIN_COLUMNS)
            for i, row in enumerate(iter_rows(ds)):
                if cap is not None and i >= cap:
                    return
                if i % world == rank:
                    yield i, row

        rng = random.Random(f"{self.seed}|shuffle|{subset}|{self.epoch}|{pass_index}|{rank}")
        for i, row in shuffle_buffer(own_rows(), self.shuffle_buffer_size, rng):
            try:
                prepared = self._prepare(subset, i, row)
            except _BadRow as bad:
                if report:
                    self._bad_row(subset, i, bad)
                continue
            yield i, prepared

    def _load(self, j: int, layout: list, rank: int, world: int) -> list[dict]:
        """The examples of batch j with their images. A row whose image does not decode is
        reported and replaced by a spare row of its subset (`_spare`), so batches stay full."""
        out = []
        for subset, i, prepared in layout:
            try:
                out.append(self._with_images(prepared))
            except _BadRow as bad:
                self._bad_row(subset, i, bad, loading=True)  # raises under on_bad_row="raise"
                exclude = {k for s, k, _ in layout if s == subset}
                k, example = self._spare(subset, j, exclude, rank, world)
                log.warning("batch %d: row %s:%d replaced by row %s:%d (its image does not decode)", j, subset, i,
                            subset, k)
                out.append(example)
        return out

    def _spare(self, subset: str, j: int, exclude: set, rank: int, world: int) -> tuple[int, dict]:
        """A row of `subset` on this rank, not in `exclude`, whose images decode: the first of a
        shuffle seeded by batch j (a function of the batch alone, so resume sees the same). Bad
        rows met on the way are the layout's to report, when it meets them."""
        for k, prepared in self._rank_rows(subset, f"spare|{j}", rank, world, report=False):
            if k in exclude:
                continue
            try:
                return k, self._with_images(prepared)
            except _BadRow:
                continue
        raise DataError(f"subset {subset!r} on rank {rank} of {world} has no row whose images decode")

    # ------------------------------------------------------------------ examples
    def _prepare(self, subset: str, i: int, row: Mapping) -> dict:
        """A row checked and laid out without decoding an image: texts as the model reads them,
        full image paths (the files must exist), document keys. Raises `_BadRow`."""
        qry_text, qry_path = self._content(row["qry"], row["qry_image_path"], "query", self.image_root)
        pos_text, pos_path = self._content(row["pos_text"], row["pos_image_path"], "document", self.image_root)
        pos_text = self._instructed(subset, pos_text, pos_path)
        pos_key = doc_key(pos_text, pos_path)
        negs = self._negatives(subset, i, row, (pos_text.strip(), pos_path))  # [(text, path, key)]
        for p in [qry_path, pos_path] + [p for _, p, _ in negs]:
            if p and not os.path.isfile(p):
                raise _BadRow("missing image", "no such file", p)
        return {"subset": subset, "row_id": f"{subset}:{i}", "qry_text": qry_text, "qry_path": qry_path,
                "pos_text": pos_text, "pos_path": pos_path, "neg_texts": [t for t, _, _ in negs],
                "neg_paths": [p for _, p, _ in negs], "pos_key": pos_key, "neg_keys": [k for _, _, k in negs]}

    def _with_images(self, prepared: dict) -> dict:
        """The training example of a prepared row: its images decoded and made processor-safe."""
        images = [self._image(p) for p in [prepared["qry_path"], prepared["pos_path"], *prepared["neg_paths"]]]
        return {"subset": prepared["subset"], "row_id": prepared["row_id"], "qry_text": prepared["qry_text"],
                "qry_image": images[0], "pos_text": prepared["pos_text"], "pos_image": images[1],
                "neg_texts": list(prepared["neg_texts"]), "neg_images": images[2:], "pos_key": prepared["pos_key"],
                "neg_keys": list(prepared["neg_keys"])}

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

    def _negatives(self, subset: str, i: int, row: Mapping, positive: tuple[str, str]) -> list[tuple[str, str, int]]:
        """`num_hardneg` negatives ``(text as read, full image path, key)``: hard-negative source
        first, else the row's own. Empty entries are passed over, and so is an entry that is the
        positive itself once both are read as the model reads them (normalised text with its
        target instruction, up to surrounding whitespace; the same image file)."""
        n = self.num_hardneg
        if n == 0:
            return []
        found = None
        try:
            if self.hardneg_path is not None:
                found = self._hardneg_index(subset).get(row)
                root = self.hardneg_image_root
            if found is None:
                found = in_row_negatives(row, f"{subset} row {i}")
                root = self.image_root
        except DataError as e:
            raise _BadRow("bad negative list", str(e)) from e
        chosen = []
        for t, p in select_negatives(found, len(found)):
            text, path = self._content(t, p, "document", root)
            text = self._instructed(subset, text, path)
            if (text.strip(), path) != positive:
                chosen.append((text, path, doc_key(text, path)))
            if len(chosen) == n:
                return chosen
        source = self.hardneg_path or "none (in-row neg_text/neg_image_path)"
        raise _BadRow("missing negatives", f"needs {n} negative(s), found {len(chosen)} usable; hard-negative "
                      f"source: {source}. Give data.hardneg.path or lower num_hardneg (0 = in-batch only)")

    def _hardneg_index(self, subset: str) -> HardNegativeIndex:
        if subset not in self._hardneg:
            self._hardneg[subset] = HardNegativeIndex.load(self.hardneg_path, subset, self.hardneg_split)
        return self._hardneg[subset]

    def _image(self, path: str):
        if not path:
            return None
        if not os.path.isfile(path):
            raise _BadRow("missing image", "no such file", path)
        try:
            return make_processor_safe(load_image(path), self.image_patch, self.max_ratio)
        except Exception as e:  # decoders raise all sorts: OSError, ValueError, SyntaxError, ...
            raise _BadRow("unreadable image", f"{type(e).__name__}: {e}", path) from e

    # ------------------------------------------------------------------ bad rows
    def _bad_row(self, subset: str, i: int, bad: _BadRow, loading: bool = False) -> None:
        """Raise (``on_bad_row="raise"``) or note a bad row for the batch being laid out or loaded.
        A row found while laying out batches is noted the first time (later passes meet it
        again); an image that does not decode each time its batch is loaded, so that what a batch
        reports depends on the batch alone (the datamodule counts each row once)."""
        file = bad.file or row_file(self.path, subset, self.split, i)
        msg = f"bad row: subset {subset!r} row {i}: {bad.reason}: {bad.detail} (file: {file})"
        if self.on_bad_row == "raise":
            raise DataError(msg + ". Fix or remove the row, or set on_bad_row='skip' to skip and count bad rows.")
        if loading or (subset, i) not in self._bad_seen:
            self._bad_seen.add((subset, i))
            self._found.append((subset, i, bad.reason, msg))

    def _report(self, found: list) -> list[tuple[str, int, str]]:
        """Count and log the bad rows reported with a batch (each row once); returns them as
        ``(subset, i, reason)``."""
        for subset, i, reason, msg in found:
            if (subset, i) in self._reported:
                continue
            self._reported.add((subset, i))
            counts = self.bad_rows.setdefault(subset, Counter())
            counts[reason] += 1
            n = counts[reason]
            if n <= 3 or n & (n - 1) == 0:  # the first few, then at powers of two
                log.warning("%s [skipped; %d '%s' rows so far in %s]", msg, n, reason, subset)
        return [(subset, i, reason) for subset, i, reason, _ in found]


class _RowSequence:
    """One subset's usable rows on one rank, in stream order: pass after pass, each reshuffled
    (``infinite``), or one pass. `take` hands out the next row that is not already in the batch
    being filled: a batch that straddles two passes would otherwise hold a row twice (the same
    query and positive, each the other's false negative). Rows passed over wait, in order, for
    the next batch. Only a subset with fewer usable rows on the rank than a batch asks for must
    repeat rows within a batch (a warning says so)."""

    def __init__(self, stream: TrainStream, subset: str, rank: int, world: int, infinite: bool):
        self.stream, self.subset, self.rank, self.world, self.infinite = stream, subset, rank, world, infinite
        self.pass_index, self.in_pass, self.pass_size = 0, 0, None
        self.rows = stream._rank_rows(subset, 0, rank, world)
        self.waiting: list[tuple[int, dict]] = []
        self.warned = False

    def _next(self) -> tuple[int, dict] | None:
        while True:
            item = next(self.rows, None)
            if item is not None:
                self.in_pass += 1
                return item
            if self.pass_size is None:
                self.pass_size = self.in_pass
            if not self.infinite or self.in_pass == 0:  # one pass done / nothing usable
                return None
            self.pass_index += 1
            self.in_pass = 0
            self.rows = self.stream._rank_rows(self.subset, self.pass_index, self.rank, self.world)

    def take(self, in_batch: set[int]) -> tuple[int, dict] | None:
        """The next row ``(index, prepared example)`` whose index is not in `in_batch`; None when
        the subset has no more rows (one pass) or none at all."""
        for k, item in enumerate(self.waiting):
            if item[0] not in in_batch:
                return self.waiting.pop(k)
        while True:
            item = self._next()
            if item is None or item[0] not in in_batch:
                return item
            if self.pass_size is not None and len(in_batch) >= self.pass_size:  # every row is in the batch
                if not self.warned:
                    self.warned = True
                    log.warning("subset %s has %d usable rows on rank %d of %d, fewer than a batch needs: its "
                                "batches repeat rows (each copy is the other's false negative; see "
                                "loss.mask_false_negatives)", self.subset, self.pass_size, self.rank, self.world)
                return item
            self.waiting.append(item)
