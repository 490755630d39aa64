"""`MMEBDataModule`: MMEB-train (+ hard negatives) for training, MMEB-eval for validation.

All constructor arguments are plain values (Hydra-friendly). With ``synthetic`` (the
keyword arguments of `generate_synthetic`, ``out_dir`` included) the synthetic dataset
is generated in `prepare_data`, and every path left None points into it.

Validation items. The unique (text, image) items of all eval subsets get one global
numbering (subset after subset, in ``eval.subsets`` order). ``eval_layout[subset]``
gives ``{"queries": [global item per query], "candidates": [[global items, positive
first]], "offset": first global index, "num_items": n}``. Across ranks the items are
split in strides: rank r takes global items ``r, r + W, r + 2W, ...`` wrapping around
to the start so that every rank gets exactly ``ceil(n / W)`` items (a few items are
repeated; a repeat carries the same ``item_index`` and the same embedding), hence the
same number of validation batches on every rank. DataLoader workers split a rank's
items in strides again.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections import Counter

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rematch_pl.data.collate import HOST_KEYS, EvalCollator, TrainCollator
from rematch_pl.data.images import load_image, make_processor_safe
from rematch_pl.data.mmeb import (DataError, EvalSet, image_root_problem, list_subsets, load_eval_subset,
                                  resolve_target_instructions)
from rematch_pl.data.stream import BAD_ROW_POLICIES, TrainStream, resolve_rank_world
from rematch_pl.data.synthetic import generate_synthetic, synthetic_paths

log = logging.getLogger(__name__)

TRAIN_KEYS = {"path": None, "image_root": None, "subsets": None, "split": "original", "caps": None, "weights": None}
HARDNEG_KEYS = {"path": None, "image_root": None, "split": "original"}
EVAL_KEYS = {"path": None, "image_root": None, "subsets": None, "split": "test", "max_queries": None}


def _plain(value):
    """OmegaConf containers -> plain Python (anything else unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _section(name: str, value, defaults: dict) -> dict:
    value = _plain(value)
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        raise ValueError(f"data.{name} must be a mapping with keys {sorted(defaults)}, got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"data.{name}: unknown key(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **value}


class EvalItems(IterableDataset):
    """This rank's share of the global eval items, loaded as ``(item_index, text, image or None)``."""

    def __init__(self, items: list[tuple[str, str | None]], rank: int = 0, world_size: int = 1,
                 image_patch: int = 28, max_ratio: float = 200):
        self.items = items  # global: (text, full image path or None)
        n = len(items)
        per_rank = math.ceil(n / world_size) if n else 0
        self.indices = [(rank + k * world_size) % n for k in range(per_rank)]
        self.image_patch, self.max_ratio = image_patch, max_ratio

    @property
    def num_items(self) -> int:
        """Items of this rank (no ``__len__``: Lightning would cap the batches it reads at
        ``ceil(len / batch_size)``, fewer than several workers yield)."""
        return len(self.indices)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in self.indices[wid::nw]:
            text, path = self.items[k]
            image = None
            if path:
                try:
                    image = make_processor_safe(load_image(path), self.image_patch, self.max_ratio)
                except Exception as e:
                    raise DataError(f"eval item {k}: cannot load image {path}: {type(e).__name__}: {e}") from e
            yield k, text, image


class MMEBDataModule(pl.LightningDataModule):
    """MMEB(-style) training stream and validation items; see the module docstring."""

    def __init__(self, train=None, hardneg=None, eval=None, num_hardneg: int = 1, target_instruction=None,
                 batch_size: int = 8, eval_batch_size: int = 32, homogeneous: bool = False, num_workers: int = 0, prefetch_factor: int = 2,
                 max_length: int | None = 256, on_bad_row: str = "raise", seed: int = 0, shuffle_buffer: int = 256,
                 synthetic=None, processor=None):
        super().__init__()
        self.train_cfg = _section("train", train, TRAIN_KEYS)
        self.hardneg_cfg = _section("hardneg", hardneg, HARDNEG_KEYS)
        self.eval_cfg = _section("eval", eval, EVAL_KEYS)
        self.synthetic = _plain(synthetic)
        if self.synthetic is not None:
            self._check_synthetic(self.synthetic)
            self._default_paths(synthetic_paths(self.synthetic["out_dir"]))
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        for name, v, lo in [("num_hardneg", num_hardneg, 0), ("batch_size", batch_size, 1),
                            ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                            ("shuffle_buffer", shuffle_buffer, 0), ("prefetch_factor", prefetch_factor, 1)]:
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"data.{name} must be an integer >= {lo}, got {v!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"data.max_length must be a positive integer or None, got {max_length!r}")
        mq = self.eval_cfg["max_queries"]
        if mq is not None and (not isinstance(mq, int) or mq < 1):
            raise ValueError(f"data.eval.max_queries must be a positive integer or None, got {mq!r}")
        self.target_instruction = _plain(target_instruction)
        resolve_target_instructions(self.target_instruction)  # validates
        self.num_hardneg, self.batch_size, self.eval_batch_size = num_hardneg, batch_size, eval_batch_size
        self.homogeneous, self.num_workers, self.max_length = bool(homogeneous), num_workers, max_length
        self.prefetch_factor = prefetch_factor
        self.on_bad_row, self.seed, self.shuffle_buffer = on_bad_row, int(seed), shuffle_buffer
        self.processor = processor
        self.pixel_dtype = torch.float32  # set_processor
        self.eval_sets: dict[str, EvalSet] = {}
        self.eval_layout: dict[str, dict] = {}
        self.eval_items: list[tuple[str, str | None]] = []
        self._bad_seen: dict[tuple[str, int], str] = {}  # (subset, row index) -> reason: rows left out
        if self.synthetic is None:
            self._check_image_roots()

    # ------------------------------------------------------------------ config
    @staticmethod
    def _check_synthetic(cfg) -> None:
        if not isinstance(cfg, dict) or "out_dir" not in cfg:
            raise ValueError(f"data.synthetic must be a mapping with at least out_dir, got {cfg!r}")
        allowed = set(inspect.signature(generate_synthetic).parameters)
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"data.synthetic: unknown key(s) {unknown}; allowed: {sorted(allowed)}")

    def _check_image_roots(self) -> None:
        """At start-up, not at the first image: every image root the real data needs is a folder
        (a hub id holds no images; MMEB's come as archives, unpacked under the image root)."""
        for name, sec in (("train", self.train_cfg), ("hardneg", self.hardneg_cfg), ("eval", self.eval_cfg)):
            problem = sec["path"] is not None and image_root_problem(f"data.{name}", sec["path"],
                                                                     sec["image_root"])
            if problem:
                raise DataError(problem)

    def _default_paths(self, paths: dict) -> None:
        t, h, e = self.train_cfg, self.hardneg_cfg, self.eval_cfg
        if t["path"] is None:
            t["path"] = paths["train"]
            t["image_root"] = t["image_root"] or paths["train_images"]
        if h["path"] is None:
            h["path"] = paths["hardneg"]
            h["image_root"] = h["image_root"] or paths["train_images"]
        if e["path"] is None:
            e["path"] = paths["eval"]
            e["image_root"] = e["image_root"] or paths["eval_images"]

    def set_processor(self, processor, pixel_dtype: torch.dtype = torch.float32) -> None:
        """The backbone's `MultimodalProcessor` (the data cannot be tokenised without it), and the
        dtype of its vision tower: batches carry their pixels in it (the tower's own cast, made
        in the DataLoader workers: bf16 halves the bytes shared between processes and copied to
        the device, and changes no result)."""
        self.processor = processor
        self.pixel_dtype = pixel_dtype

    def _require_processor(self):
        if self.processor is None:
            raise RuntimeError("MMEBDataModule has no processor: call datamodule.set_processor(processor) "
                               "with the backbone's MultimodalProcessor before asking for dataloaders")
        return self.processor

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return resolve_rank_world()

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            generate_synthetic(**self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.synthetic is not None:  # idempotent; normally already done by prepare_data
            generate_synthetic(**self.synthetic)
        if stage in (None, "fit", "validate") and self.eval_cfg["path"] is not None and not self.eval_sets:
            self._load_eval()

    def _load_eval(self) -> None:
        cfg = self.eval_cfg
        path = os.fspath(cfg["path"])
        root = cfg["image_root"] if cfg["image_root"] is not None else path
        subsets = cfg["subsets"] or list_subsets(path)
        self.eval_sets, self.eval_layout, self.eval_items = {}, {}, []
        for subset in subsets:
            es = load_eval_subset(path, root, subset, max_queries=cfg["max_queries"], split=cfg["split"],
                                  target_instruction=self.target_instruction)
            offset = len(self.eval_items)
            self.eval_sets[subset] = es
            self.eval_items.extend((text, es.image_file(k)) for k, (text, _) in enumerate(es.items))
            self.eval_layout[subset] = {
                "queries": [offset + q for q in es.queries],
                "candidates": [[offset + c for c in cands] for cands in es.candidates],
                "offset": offset,
                "num_items": len(es.items),
            }

    @property
    def num_eval_items(self) -> int:
        return len(self.eval_items)

    # ------------------------------------------------------------------ dataloaders
    def train_stream(self) -> TrainStream:
        t, h = self.train_cfg, self.hardneg_cfg
        if t["path"] is None:
            raise ValueError("data.train.path is not set (and no data.synthetic): nothing to train on")
        rank, world = self._rank_world()
        return TrainStream(
            t["path"], t["image_root"], t["subsets"], t["split"],
            hardneg_path=h["path"], hardneg_image_root=h["image_root"], hardneg_split=h["split"],
            num_hardneg=self.num_hardneg, target_instruction=self.target_instruction,
            batch_size=self.batch_size, homogeneous=self.homogeneous, caps=t["caps"], weights=t["weights"],
            seed=self.seed, shuffle_buffer=self.shuffle_buffer, on_bad_row=self.on_bad_row,
            rank=rank, world_size=world)

    # ------------------------------------------------------------------ exact resume
    # What a batch's rows depend on besides the batch index (`TrainStream`: not the workers).
    STREAM_LAYOUT = ("world_size", "batch_size", "homogeneous", "seed")

    def _stream_layout(self) -> dict:
        return {"world_size": self._rank_world()[1], "batch_size": int(self.batch_size),
                "homogeneous": bool(self.homogeneous), "seed": int(self.seed)}

    def state_dict(self) -> dict:
        """Saved in every checkpoint: how many training batches this rank has consumed, the
        settings that decide which rows make up a batch, and the bad rows left out so far."""
        consumed = 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            consumed = int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)
        return {"train_batches_consumed": consumed, "stream_layout": self._stream_layout(),
                "bad_rows": [[s, i, r] for (s, i), r in sorted(self._bad_seen.items())]}

    def load_state_dict(self, state: dict) -> None:
        """On resume the training stream skips the batches consumed before the checkpoint, and the
        bad-row counts go on from the checkpoint's (the skipped batches report none)."""
        self._resume_skip = int(state.get("train_batches_consumed", 0))
        self._resume_layout = state.get("stream_layout")
        self._bad_seen = {}
        self._count_bad_rows(state.get("bad_rows", []))

    def _check_resume_layout(self) -> None:
        """A resume that changes what makes up a batch cannot continue the stream exactly: say so."""
        saved = getattr(self, "_resume_layout", None)
        if not saved or not getattr(self, "_resume_skip", 0):
            return
        now = self._stream_layout()
        changed = {k: (saved.get(k), now[k]) for k in self.STREAM_LAYOUT if k in saved and saved[k] != now[k]}
        if changed and self._rank_world()[0] == 0:
            log.warning("resuming with a different %s (checkpoint -> now): the training stream skips the %d batches "
                        "consumed, but they are laid out differently now, so some rows will repeat and others be "
                        "skipped before the stream's next pass. The number of dataloader workers does not matter.",
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()), self._resume_skip)

    def train_dataloader(self) -> DataLoader:
        collate = TrainCollator(self._require_processor(), self.max_length, self.pixel_dtype)
        stream = self.train_stream()
        self._check_resume_layout()
        stream.skip_batches = getattr(self, "_resume_skip", 0)
        return DataLoader(stream, batch_size=None, collate_fn=collate, **self._worker_kwargs())

    def val_dataloader(self):
        if self.eval_cfg["path"] is None:
            return []
        if not self.eval_sets:
            self._load_eval()
        rank, world = self._rank_world()
        dataset = EvalItems(self.eval_items, rank, world)
        return DataLoader(dataset, batch_size=self.eval_batch_size,
                          collate_fn=EvalCollator(self._require_processor(), self.max_length, self.pixel_dtype),
                          **self._worker_kwargs())

    def _worker_kwargs(self) -> dict:
        """Dataloader workers decode images in parallel; each keeps `prefetch_factor` batches ready.
        On a GPU, batches are pinned (a pin-memory thread), so pixels reach it asynchronously."""
        pin = {"pin_memory": torch.cuda.is_available()}
        if self.num_workers == 0:
            return {"num_workers": 0, **pin}
        return {"num_workers": self.num_workers, "persistent_workers": True, "prefetch_factor": self.prefetch_factor,
                **pin}

    # ------------------------------------------------------------------ device transfer
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Everything but the packing metadata goes to the device. Token ids, lengths, image
        indices and grids (`collate.HOST_KEYS`) stay on the host, where the model lays out its
        packed sequences: read from the device they would stall the host at every pass."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in HOST_KEYS}, device,
                                                 dataloader_idx)
        return {k: batch[k] if k in HOST_KEYS else moved[k] for k in batch}

    # ------------------------------------------------------------------ bad-row accounting
    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Collect the rows the stream left out (they come from the workers inside batches)."""
        if isinstance(batch, dict) and "bad_rows" in batch:
            self._count_bad_rows(batch.pop("bad_rows"))
        return batch

    def _count_bad_rows(self, rows) -> None:
        """Count each ``(subset, row index, reason)`` once: a row can be reported again by another
        worker (an image that does not decode is met only by the worker loading it) or pass."""
        for subset, i, reason in rows:
            self._bad_seen.setdefault((subset, int(i)), reason)

    @property
    def bad_rows(self) -> dict[str, Counter]:
        """``{subset: {reason: rows}}`` left out so far on this rank, each row once."""
        return _by_subset(self._bad_seen)

    @property
    def bad_row_count(self) -> int:
        """Rows left out so far on this rank."""
        return len(self._bad_seen)

    def all_bad_rows(self) -> dict[str, dict[str, int]]:
        """``{subset: {reason: rows}}`` over all ranks (ranks hold disjoint rows). Collective under
        an initialised ``torch.distributed``: every rank must call it."""
        seen = dict(self._bad_seen)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, seen)
            seen = {k: v for part in parts for k, v in part.items()}
        return {s: dict(c) for s, c in _by_subset(seen).items()}


def _by_subset(seen: dict[tuple[str, int], str]) -> dict[str, Counter]:
    """{(subset, row): reason} -> {subset: {reason: rows}}."""
    out: dict[str, Counter] = {}
    for (subset, _), reason in sorted(seen.items()):
        out.setdefault(subset, Counter())[reason] += 1
    return out
