"""Collators: lists of examples -> token-id tensors + one processed image batch.

Training batch (`TrainCollator`), with B examples and N negatives each::

    {"qry": {"ids": LongTensor[B, L] (right-padded with processor.pad_id),
             "lengths": LongTensor[B],
             "image": LongTensor[B]  (row of this batch's images, -1 = no image)},
     "pos": same, B rows, plus "key": LongTensor[B] (document identities, `stream.doc_key`),
     "neg": same, B*N rows, instance-major (example i's negatives at rows i*N .. i*N+N-1), with
            "key", or None when N == 0,
     "pixel_values": Tensor (all images of the batch, processor output concatenated),
     "image_grid_thw": LongTensor[n_images, 3],
     "subset": list[str], "row_id": list[str],
     "bad_rows": [(subset, row index, reason)] rows the stream left out while making this batch}

Images are numbered queries first, then positives, then negatives (instance-major), so
each role's images are contiguous; image k's patches are rows
``sum(grid[:k].prod(-1)) .. sum(grid[:k+1].prod(-1))`` of ``pixel_values``. All images of a
batch go through one ``processor.process_images`` call. Token ids come from
``processor.encode_content``, which expands each image placeholder to exactly
``grid.prod() // merge**2`` image tokens and never truncates inside them.

Eval batch (`EvalCollator`), from ``(item_index, text, image or None)`` items::

    {"items": {"ids", "lengths", "image"}, "pixel_values", "image_grid_thw",
     "item_index": LongTensor[B]}

On a GPU only the payload (pixels, item indices) moves to the device; the packing metadata
(`HOST_KEYS`: token ids, lengths, image indices, grids) stays on the host, where the model lays
out its packed sequences (`MMEBDataModule.transfer_batch_to_device`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rematch_pl.backbone.processor import ContentError
from rematch_pl.data.mmeb import DataError

HOST_KEYS = ("qry", "pos", "neg", "items", "image_grid_thw")  # batch entries read on the host


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``ids [n, L]`` and ``lengths [n]``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    L = int(lengths.max()) if len(seqs) else 0
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


class _Encoder:
    """Shared part: register images, process them once, encode contents."""

    def __init__(self, processor, max_length: int | None, pixel_dtype: torch.dtype = torch.float32):
        if max_length is not None and int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        self.processor = processor
        self.max_length = None if max_length is None else int(max_length)
        # the vision tower's dtype: the cast it makes, made here (half the bytes to share and copy in bf16)
        self.pixel_dtype = pixel_dtype

    def _images(self, images: list):
        batch = self.processor.process_images(images)
        n_tokens = [self.processor.num_image_tokens(g) for g in batch.grid_thw]
        return type(batch)(batch.pixel_values.to(self.pixel_dtype), batch.grid_thw), n_tokens

    def _side(self, contents: list[tuple[str, int]], n_tokens: list[int], where) -> dict:
        """contents: [(text, image index or -1)] -> {"ids", "lengths", "image"}."""
        seqs = []
        for k, (text, image) in enumerate(contents):
            try:
                seqs.append(self.processor.encode_content(text, n_tokens[image] if image >= 0 else None,
                                                          self.max_length))
            except ContentError as e:
                raise DataError(f"{where(k)}: {e}") from e
        ids, lengths = pad_ids(seqs, self.processor.pad_id)
        return {"ids": ids, "lengths": lengths, "image": torch.tensor([i for _, i in contents], dtype=torch.long)}


class TrainCollator(_Encoder):
    """List of training examples (from `TrainStream`) -> the model batch (format in the module docstring)."""

    def __call__(self, examples: Sequence[dict]) -> dict:
        if not examples:
            raise DataError("empty batch")
        n_neg = len(examples[0]["neg_texts"])
        for ex in examples:
            if len(ex["neg_texts"]) != n_neg or len(ex["neg_images"]) != n_neg:
                raise DataError(f"row {ex['row_id']}: {len(ex['neg_texts'])} negative texts and "
                                f"{len(ex['neg_images'])} negative images, expected {n_neg} of each")
        images = []

        def add(img) -> int:
            if img is None:
                return -1
            images.append(img)
            return len(images) - 1

        qry = [(ex["qry_text"], add(ex["qry_image"])) for ex in examples]
        pos = [(ex["pos_text"], add(ex["pos_image"])) for ex in examples]
        neg = [(t, add(im)) for ex in examples for t, im in zip(ex["neg_texts"], ex["neg_images"])]
        image_batch, n_tokens = self._images(images)

        def where(role, per):
            def name(k):
                ex = examples[k // per]
                extra = f" negative {k % per}" if role == "neg" else ""
                return f"bad row: subset {ex['subset']!r} row {ex['row_id']} ({role}{extra})"
            return name

        sides = {"qry": self._side(qry, n_tokens, where("qry", 1)), "pos": self._side(pos, n_tokens, where("pos", 1)),
                 "neg": self._side(neg, n_tokens, where("neg", n_neg)) if n_neg else None}
        if all("pos_key" in ex for ex in examples):  # document identities (`stream.doc_key`)
            sides["pos"]["key"] = torch.tensor([ex["pos_key"] for ex in examples], dtype=torch.long)
            if n_neg:
                sides["neg"]["key"] = torch.tensor([k for ex in examples for k in ex["neg_keys"]], dtype=torch.long)
        return {
            **sides,
            "pixel_values": image_batch.pixel_values,
            "image_grid_thw": image_batch.grid_thw.long(),
            "subset": [ex["subset"] for ex in examples],
            "row_id": [ex["row_id"] for ex in examples],
            "bad_rows": list(getattr(examples, "bad_rows", None) or []),
        }


class EvalCollator(_Encoder):
    """List of ``(item_index, text, PIL image or None)`` -> the eval batch (format in the module docstring)."""

    def __call__(self, items: Sequence[tuple[int, str, object]]) -> dict:
        if not items:
            raise DataError("empty eval batch")
        images = []
        contents = []
        for _, text, img in items:
            if img is not None:
                images.append(img)
            contents.append((text, len(images) - 1 if img is not None else -1))
        image_batch, n_tokens = self._images(images)
        side = self._side(contents, n_tokens, lambda k: f"eval item {items[k][0]}")
        return {"items": side, "pixel_values": image_batch.pixel_values,
                "image_grid_thw": image_batch.grid_thw.long(),
                "item_index": torch.tensor([int(i) for i, _, _ in items], dtype=torch.long)}
