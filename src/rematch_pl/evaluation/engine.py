"""The encoding engine: (text, image, side) requests -> embeddings, each unique one encoded once.

`Engine.encode(requests)`:

1. keys every request (`cache.item_key`: side, text, image identity) and asks the cache which
   are missing (rank 0 decides and broadcasts, so all ranks agree);
2. groups the missing ones by (text, image): an item needed as a query *and* as a document is
   loaded, its image processed and run through the vision tower once, and both token sets are
   appended in the same backbone pass; items that share an image file with different texts
   (several questions on one picture, several objects to ground in it) form one *unit*: the image
   is decoded, processed and run through the vision tower once for all of them;
3. sorts the units by estimated sequence length (text tokens + image tokens from the image size)
   and deals them out to the ranks in strides (balanced), then cuts each rank's share into
   batches of similar lengths (``batch_size`` rows, at most ``max_tokens`` padded tokens);
4. decodes and processes each image and tokenises each text in DataLoader workers (``num_workers``;
   units, not whole batches, are dealt to the workers, so one batch's images decode in parallel),
   encodes on the device (bf16 on GPU) with one batch in flight (batch k's embeddings come back
   to the host while batch k+1 is loaded, packed and queued), writes a cache chunk every
   ``flush_every`` items (interruptible);
5. gathers every rank's new embeddings on rank 0 (in pieces, through the CPU) and returns, on
   rank 0, the float32 embeddings of all requests in order (``None`` on the other ranks).

Several devices run through Lightning Fabric (``ddp``: each rank encodes a shard).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..backbone.sequence import to_device
from .cache import EmbeddingCache, image_identity, item_key

SIDES = ("qry", "doc")


@dataclass(frozen=True)
class Request:
    text: str
    image: str | None  # full path (or None)
    side: str  # "qry" | "doc"
    image_name: str | None = None  # the dataset's name for the image (cache key); default: the path


def model_side(model, side: str) -> str:
    """The side an embedding really depends on: 'any' when queries and documents share the function."""
    if side not in SIDES:
        raise ValueError(f"side={side!r}: expected 'qry' or 'doc'")
    f = model.fusion
    return "any" if f.k == 0 or f.sets == "shared" else side


# ====================================================================== batching
def _smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (image size -> processed size), for token estimates only."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def estimate_image_tokens(path: str, processor) -> int:
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:
        return 256
    factor = processor.patch_size * processor.merge_size
    lo, hi = processor.pixel_range
    hb, wb = _smart_resize(max(h, factor), max(w, factor), factor, lo, hi)
    return hb * wb // factor**2


def make_batches(lengths: list[int], rows: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive items (already sorted, longest first) -> batches of <= batch_size rows and
    <= max_tokens padded tokens (rows x longest length)."""
    batches, cur, cur_rows, cur_len = [], [], 0, 0
    for i, (n, r) in enumerate(zip(lengths, rows)):
        longest = max(cur_len, n)
        if cur and (cur_rows + r > batch_size or (max_tokens and (cur_rows + r) * longest > max_tokens)):
            batches.append(cur)
            cur, cur_rows, longest = [], 0, n
        cur.append(i)
        cur_rows += r
        cur_len = longest
    if cur:
        batches.append(cur)
    return batches


def image_units(items: list[tuple[str, str | None]], lengths: list[int], rows: list[int], max_rows: int,
                max_tokens: int | None = None) -> list[list[int]]:
    """Work items -> loading units, longest first: the items that share an image file form one unit
    (within a batch's caps: `max_rows` rows, an item encoded as query and document counting twice,
    and `max_tokens` padded tokens), whose image is decoded, processed and encoded by the vision
    tower once; a text-only item is a unit of its own. With no shared image this is the items
    sorted by length (ties: first seen first)."""
    units: list[list[int]] = []
    by_image: dict[str, list[int]] = {}
    for i, (_, path) in enumerate(items):
        if path is None:
            units.append([i])
        else:
            by_image.setdefault(path, []).append(i)
    for group in by_image.values():
        cur, n = [], 0
        for i in sorted(group, key=lambda i: (-lengths[i], i)):
            full = n + rows[i] > max_rows or (max_tokens and (n + rows[i]) * lengths[cur[0] if cur else i] > max_tokens)
            if cur and full:
                units.append(cur)
                cur, n = [], 0
            cur.append(i)
            n += rows[i]
        units.append(cur)
    return sorted(units, key=lambda u: (-max(lengths[i] for i in u), u[0]))


def _as_is(x):
    """The DataLoader's collate for single units (no conversion of the token-id lists)."""
    return x


class _Units(Dataset):
    """Loading units of one rank, each loaded on its own in a DataLoader worker: its image (if any)
    decoded and processed into patches once, each of its texts tokenised ->
    ``(item indices, [ids per item], pixel_values or None, grid or None)``. Units (not batches)
    are what the workers share, so the images of one batch decode in parallel."""

    def __init__(self, units: list[tuple[str | None, list[int], list[str]]], processor, max_length: int | None,
                 image_patch: int = 28, pixel_dtype: torch.dtype = torch.float32):
        self.units, self.processor, self.max_length, self.image_patch = units, processor, max_length, image_patch
        self.pixel_dtype = pixel_dtype  # the model's dtype: the cast the model would do, done here (half the copying)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, u: int):
        from rematch_pl.backbone.processor import ContentError
        from rematch_pl.data.images import load_image, make_processor_safe
        from rematch_pl.data.mmeb import DataError

        path, index, texts = self.units[u]
        pv = grid = n_tokens = None
        if path:
            try:
                image = make_processor_safe(load_image(path), self.image_patch)
            except Exception as e:
                raise DataError(f"cannot load image {path}: {type(e).__name__}: {e}") from e
            ib = self.processor.process_images([image])
            pv, grid = ib.pixel_values.to(self.pixel_dtype), ib.grid_thw[0]
            n_tokens = self.processor.num_image_tokens(grid)
        ids = []
        for text in texts:
            try:
                ids.append(self.processor.encode_content(text, n_tokens, self.max_length))
            except ContentError as e:
                raise DataError(f"eval item {text[:80]!r} (image {path}): {e}") from e
        return index, ids, pv, grid


def collate_units(units: list, processor) -> dict:
    """Loaded units -> the eval batch of `rematch_pl.data.collate.EvalCollator` (same format), one
    row per item; the items of a unit point at its one image. ``item_index``: each row's item."""
    from rematch_pl.data.collate import pad_ids

    ids, lengths = pad_ids([x for u in units for x in u[1]], processor.pad_id)
    image, index, pvs, grids = [], [], [], []
    for idx, _, pv, grid in units:
        image += [len(pvs) if pv is not None else -1] * len(idx)
        index += idx
        if pv is not None:
            pvs.append(pv)
            grids.append(grid)
    empty = processor.process_images([])
    return {"items": {"ids": ids, "lengths": lengths, "image": torch.tensor(image, dtype=torch.long)},
            "pixel_values": torch.cat(pvs) if pvs else empty.pixel_values,
            "image_grid_thw": torch.stack(grids).long() if grids else empty.grid_thw,
            "item_index": torch.tensor(index, dtype=torch.long)}


# ====================================================================== model call
@torch.no_grad()
def embed_batch(model, batch: dict, sides: list[list[str]], device, dtype, out_device="cpu",
                non_blocking: bool = False) -> list[tuple[int, str, torch.Tensor]]:
    """One collated batch -> [(row in batch, side, fused embedding [d], float32 on `out_device`)]
    for every requested side. `non_blocking`: the copy to the host is queued, not waited for
    (the caller synchronises before reading the embeddings; pinned host memory)."""
    grids = batch["image_grid_thw"]
    pv = batch["pixel_values"]
    # grids stay on the host (the packing reads them there); pixels go in an asynchronous copy
    feats = model.backbone.encode_images(to_device(pv, device).to(dtype), grids) if grids.numel() else []
    contents = model.contents(batch["items"])
    groups, owners = [], []
    for side in ("qry", "doc", "any"):
        sel = [i for i, s in enumerate(sides) if side in s]
        if sel:
            groups.append(("qry" if side == "any" else side, [contents[i] for i in sel]))
            owners.append((side, sel))
    outs = model.embed(groups, feats, grids)
    res = []
    for (side, sel), (fused, _) in zip(owners, outs):
        fused = fused.float().to(out_device, non_blocking=non_blocking)
        res += [(i, side, fused[j]) for j, i in enumerate(sel)]
    return res


# ====================================================================== engine
class Engine:
    """Encodes requests with a `ReMatchModel` through the cache, on one or several ranks (Fabric)."""

    def __init__(self, model, fabric=None, cache: EmbeddingCache | None = None, batch_size: int = 32,
                 max_tokens: int | None = None, num_workers: int = 0, max_length: int | None = None,
                 flush_every: int = 2048, progress: bool = True, gather_piece: int = 4096):
        self.model = model
        self.fabric = fabric
        self.cache = cache if cache is not None else EmbeddingCache(None, "memory")
        self.batch_size, self.max_tokens, self.num_workers = batch_size, max_tokens, num_workers
        self.max_length, self.flush_every, self.progress = max_length, flush_every, progress
        self.gather_piece = gather_piece
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.stats = {"requests": 0, "unique": 0, "encoded": 0, "cache_hits": 0, "image_reuses": 0,
                      "encode_s": 0.0, "data_wait_s": 0.0, "model_s": 0.0}

    # ---------------------------------------------------------------- distributed helpers
    @property
    def rank(self) -> int:
        return self.fabric.global_rank if self.fabric is not None else 0

    @property
    def world(self) -> int:
        return self.fabric.world_size if self.fabric is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        return self.fabric.broadcast(obj, src=0) if self.world > 1 else obj

    def barrier(self) -> None:
        if self.world > 1:
            self.fabric.barrier()

    # ---------------------------------------------------------------- main entry
    def keys(self, requests: list[Request]) -> list[bytes]:
        return [item_key(model_side(self.model, r.side), r.text, image_identity(r.image, r.image_name))
                for r in requests]

    def encode(self, requests: list[Request], desc: str = "items") -> torch.Tensor | None:
        keys = self.keys(requests)
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        missing = [i for k, i in first.items() if k not in self.cache] if self.is_main else None
        missing = self.broadcast(missing)
        self.stats["requests"] += len(requests)
        self.stats["unique"] += len(first)
        self.stats["cache_hits"] += len(first) - len(missing)
        if missing:
            t0 = time.perf_counter()
            self._encode_missing([requests[i] for i in missing], [keys[i] for i in missing], desc)
            self.stats["encode_s"] += time.perf_counter() - t0
            self.stats["encoded"] += len(missing)
        if not self.is_main:
            return None
        return self.cache.get(keys)

    # ---------------------------------------------------------------- encoding the missing ones
    def _work_items(self, reqs: list[Request]):
        """Group jobs by (text, image): -> items [(text, path)], sides per item [[side]], jobs per item [[job]]."""
        index: dict[tuple[str, str | None], int] = {}
        items, sides, jobs = [], [], []
        for j, r in enumerate(reqs):
            key = (r.text, r.image)
            if key not in index:
                index[key] = len(items)
                items.append(key)
                sides.append([])
                jobs.append([])
            k = index[key]
            side = model_side(self.model, r.side)
            if side not in sides[k]:
                sides[k].append(side)
            jobs[k].append(j)
        return items, sides, jobs

    def _lengths(self, items: list[tuple[str, str | None]]) -> list[int]:
        proc = self.model.backbone.processor
        texts = [t for t, _ in items]
        tok = proc.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        extra = self.model.fusion.k + 32  # learnable tokens, template
        return [len(t) + extra + (estimate_image_tokens(p, proc) if p else 0) for t, (_, p) in zip(tok, items)]

    def _encode_missing(self, reqs: list[Request], keys: list[bytes], desc: str) -> None:
        items, sides, jobs = self._work_items(reqs)
        lengths = self._lengths(items)
        rows = [len(s) for s in sides]
        units = image_units(items, lengths, rows, self.batch_size, self.max_tokens)
        mine = units[self.rank::self.world]  # strided over the length order: balanced shards
        batches = make_batches([max(lengths[i] for i in u) for u in mine], [sum(rows[i] for i in u) for u in mine],
                               self.batch_size, self.max_tokens)
        # image loads and vision-tower passes saved by the units (all ranks: every rank knows every unit)
        self.stats["image_reuses"] += sum(len(u) - 1 for u in units if items[u[0]][1] is not None)
        proc = self.model.backbone.processor
        ds = _Units([(items[u[0]][1], u, [items[i][0] for i in u]) for u in mine], proc, self.max_length,
                    pixel_dtype=self.dtype)
        extra = {}
        if self.num_workers and batches:  # enough units in flight to fill the next two batches, sized by the
            # first (longest-item) batch: image units hold their pixels in shared memory; text units are small
            extra["prefetch_factor"] = max(2, math.ceil(2 * len(batches[0]) / self.num_workers))
        loader = DataLoader(ds, batch_size=None, sampler=[k for b in batches for k in b], num_workers=self.num_workers,
                            collate_fn=_as_is, persistent_workers=False, **extra)
        loaded = iter(loader)
        bar = None
        total_rows = sum(len(s) for s in sides)
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_rows, desc=f"encode {desc}", unit="item", dynamic_ncols=True, mininterval=1.0,
                       leave=True)
        done_jobs: list[int] = []
        done_embs: list[torch.Tensor] = []
        since_flush = 0
        cuda = self.device.type == "cuda"

        def store(local: list[int], out: list, copied) -> None:
            """Cache one batch's embeddings (after their copy to the host has finished)."""
            nonlocal since_flush
            if copied is not None:
                t = time.perf_counter()
                copied.synchronize()
                self.stats["model_s"] += time.perf_counter() - t
            new_keys, new_embs = [], []
            for row, side, emb in out:
                wi = local[row]
                for j in jobs[wi]:
                    if model_side(self.model, reqs[j].side) == side:
                        if self.world > 1:  # kept for the gather on rank 0
                            done_jobs.append(j)
                            done_embs.append(emb)
                        new_keys.append(keys[j])
                        new_embs.append(emb)
            self.cache.put(new_keys, torch.stack(new_embs))
            since_flush += len(new_keys)
            if since_flush >= self.flush_every:
                self.cache.flush()
                since_flush = 0
            if bar is not None:
                bar.update(min(len(out) * self.world, bar.total - bar.n))

        # One batch in flight: batch k's embeddings come back to the host (asynchronously) while
        # the host loads, collates and packs batch k+1 and queues it; they are cached after that.
        pending = None
        for b in batches:
            t0 = time.perf_counter()
            units = [next(loaded) for _ in b]  # waiting for the workers (input-bound when large)
            t1 = time.perf_counter()
            batch = collate_units(units, proc)
            local = batch["item_index"].tolist()  # the work item of each row
            b_sides = [sides[i] for i in local]
            out = embed_batch(self.model, batch, b_sides, self.device, self.dtype, non_blocking=cuda)
            copied = None
            if cuda:
                copied = torch.cuda.Event()
                copied.record()
            t2 = time.perf_counter()
            self.stats["data_wait_s"] += t1 - t0
            self.stats["model_s"] += t2 - t1
            if pending is not None:
                store(*pending)
            pending = (local, out, copied)
        if pending is not None:
            store(*pending)
        self.cache.flush()
        if bar is not None:
            bar.close()
        if self.world > 1:
            self._gather(done_jobs, done_embs, keys)

    def _gather(self, done_jobs: list[int], done_embs: list[torch.Tensor], keys: list[bytes]) -> None:
        """Every rank's (job, embedding) pairs to rank 0, in pieces of `gather_piece` rows."""
        f = self.fabric
        dev = f.device
        d = self.model.backbone.hidden_size
        n = torch.tensor([len(done_jobs)], device=dev)
        counts = f.all_gather(n).view(-1).tolist()
        jobs_t = torch.tensor(done_jobs, dtype=torch.long)
        embs_t = torch.stack(done_embs) if done_embs else torch.zeros(0, d)
        piece = self.gather_piece
        for s in range(0, max(counts), piece):
            m = min(piece, max(counts) - s)
            j = torch.full((m,), -1, dtype=torch.long)
            e = torch.zeros(m, d)
            cj, ce = jobs_t[s:s + m], embs_t[s:s + m]
            j[: len(cj)], e[: len(ce)] = cj, ce
            gj = f.all_gather(j.to(dev)).reshape(-1).cpu()  # [W*m]
            ge = f.all_gather(e.to(dev)).reshape(-1, d).cpu()  # [W*m, d]
            if self.is_main:
                ok = gj >= 0
                self.cache.put([keys[i] for i in gj[ok].tolist()], ge[ok])
        self.barrier()  # the other ranks' chunks are on disk (on a shared file system)
        if self.is_main:
            self.cache.flush(rescan=True)  # writes only what is not on disk yet (no shared file system)


def default_num_workers(processes: int = 1) -> int:
    """DataLoader workers per process: up to 8, leaving a core per process for the main loop."""
    return max(0, min(8, (os.cpu_count() or 1) // processes - 1))
