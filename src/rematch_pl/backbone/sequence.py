"""Packed input sequences for the backbone: token ids, image features, inserted vectors, M-RoPE positions.

Every forward pass of ReMatch (the embedding passes and the matching pass) is described as a list
of rows; a row is a list of *segments*; a segment is a list of *parts*:

* ``Ids(ids, image)``: token ids, possibly holding one image block (``image`` indexes the step's
  image features);
* ``Vecs(vectors)``: vectors placed directly in the input space (learnable tokens, projected
  features, marker embeddings), ``vectors`` is [n, d].

`build_inputs` turns the rows into ``inputs_embeds`` [B, L, d], 3-D ``position_ids`` [3, B, L]
and per-token segment ids [B, L]. Positions follow Qwen2-VL's M-RoPE rule (`get_rope_index`): a
text or vector token advances all three axes by one; an image block of merged grid (t, h, w)
gets (start, start + row, start + col) and the next token resumes at start + max(h, w). Each
segment is positioned as if it started at 0 and is then shifted by the segment's start offset,
so a segment's computation is independent of what is packed before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.profiler import record_function


@dataclass
class Ids:
    ids: list[int] | torch.Tensor
    image: int | None = None  # index into the step's image features; its tokens are image pads


@dataclass
class Vecs:
    vectors: torch.Tensor  # [n, d]


@dataclass
class Segment:
    parts: list
    start: int = 0  # position offset of the segment
    tag: int = 0  # caller-defined id (matching uses it to build the block mask)


@dataclass
class Packed:
    inputs_embeds: torch.Tensor  # [B, L, d]
    position_ids: torch.Tensor  # [3, B, L]
    segment_ids: torch.Tensor  # [B, L]  tag of each token's segment, -1 for padding
    lengths: torch.Tensor  # [B]
    vector_index: list = field(default_factory=list)  # per row, per segment: (start, end) token spans
    host_lengths: list[int] = field(default_factory=list)  # `lengths` on the host (no device read)


# Set by `rematch_pl.sync_audit.SyncAudit` while it runs: marks what `to_device` returns as a
# device tensor (on the CPU the copy is the host tensor itself).
copy_hook = None


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without stalling the host: a CUDA copy from pageable memory waits
    for the work queued on the device, so CUDA copies go from pinned memory, asynchronously."""
    device = torch.device(device)
    if copy_hook is not None:
        return copy_hook(t, device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def grid_rows(grids) -> list[list[int]] | None:
    """Image grids [n, 3] as host lists (t, h, w). Callers pass host grids: reading a device
    tensor here would wait for the device."""
    if grids is None or isinstance(grids, list):
        return grids
    return grids.tolist()


def n_tokens(parts: list) -> int:
    """Number of tokens a list of parts (`Ids`, `Vecs`) occupies in a row."""
    return sum(p.vectors.shape[0] if isinstance(p, Vecs) else len(p.ids) for p in parts)


def _host_ids(ids) -> np.ndarray:
    return ids.numpy(force=True) if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)


def _image_block(ids: np.ndarray, image_token_id: int, grid: list[int], merge: int) -> tuple[int, int, int, int, int]:
    """(first, end) token index of the image block in `ids` and its merged grid (t, gh, gw)."""
    idx = np.flatnonzero(ids == image_token_id)
    t, h, w = grid
    gh, gw = h // merge, w // merge
    s, e = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)
    if e - s != t * gh * gw or idx.size != e - s:
        raise ValueError(f"image block has {idx.size} tokens in {e - s} positions but its grid {t}x{h}x{w} "
                         f"needs {t * gh * gw} consecutive image tokens")
    return s, e, t, gh, gw


def _positions(seg: Segment, image_token_id: int, grids: list | None, merge: int) -> tuple[np.ndarray, int]:
    """3-D positions [3, n] (int64, host) of one segment and the next free position."""
    pos = []
    cur = seg.start
    for part in seg.parts:
        if isinstance(part, Vecs) or part.image is None:
            n = part.vectors.shape[0] if isinstance(part, Vecs) else len(part.ids)
            pos.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
            cur += n
            continue
        ids = _host_ids(part.ids)
        s, e, t, gh, gw = _image_block(ids, image_token_id, grids[part.image], merge)
        pos.append(np.broadcast_to(np.arange(cur, cur + s), (3, s)))
        cur += s
        tt, hh, ww = np.indices((t, gh, gw)).reshape(3, -1)  # [3, t * gh * gw]
        pos.append(np.stack([tt, hh, ww]) + cur)
        cur += max(gh, gw)
        rest = ids.size - e
        pos.append(np.broadcast_to(np.arange(cur, cur + rest), (3, rest)))
        cur += rest
    if not pos:
        return np.zeros((3, 0), dtype=np.int64), cur
    return np.concatenate(pos, axis=1).astype(np.int64, copy=False), cur


def segment_positions(seg: Segment, image_token_id: int, grids, merge: int) -> tuple[torch.Tensor, int]:
    """3-D positions [3, n] of one segment and the next free position (both including `seg.start`)."""
    pos, cur = _positions(seg, image_token_id, grid_rows(grids), merge)
    return torch.from_numpy(pos), cur


def segment_span(seg: Segment, image_token_id: int, grids, merge: int) -> int:
    """Number of positions a segment occupies when it starts at 0: each token takes one, an image
    block of merged grid (t, gh, gw) takes max(gh, gw) for its t * gh * gw tokens."""
    grids = grid_rows(grids)
    span = 0
    for part in seg.parts:
        if isinstance(part, Vecs):
            span += part.vectors.shape[0]
        elif part.image is None:
            span += len(part.ids)
        else:
            t, h, w = grids[part.image]
            gh, gw = h // merge, w // merge
            span += len(part.ids) - t * gh * gw + max(gh, gw)
    return span


def _layout(rows: list[list[Segment]], image_token_id: int, pad_id: int, grids: list | None, merge: int):
    """Host arrays of the packed rows: ids [B, L], positions [3, B, L], segment ids [B, L], the
    mask of inserted vectors [B, L]; the vectors and images in row-major token order; the
    segments' token spans per row; the row lengths."""
    lengths = [sum(n_tokens(seg.parts) for seg in row) for row in rows]
    B, L = len(rows), max(lengths, default=0)
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    position_ids = np.zeros((3, B, L), dtype=np.int64)
    segment_ids = np.full((B, L), -1, dtype=np.int64)
    vec_mask = np.zeros((B, L), dtype=bool)
    vec_chunks: list[torch.Tensor] = []
    img_order: list[int] = []
    spans_rows = []
    for b, row in enumerate(rows):
        n, spans = 0, []
        for seg in row:
            pos, _ = _positions(seg, image_token_id, grids, merge)
            start = n
            position_ids[:, b, n:n + pos.shape[1]] = pos
            for part in seg.parts:
                if isinstance(part, Vecs):
                    k = part.vectors.shape[0]
                    vec_mask[b, n:n + k] = True
                    vec_chunks.append(part.vectors)
                else:
                    k = len(part.ids)
                    input_ids[b, n:n + k] = _host_ids(part.ids)
                    if part.image is not None:
                        img_order.append(part.image)
                n += k
            segment_ids[b, start:n] = seg.tag
            spans.append((start, n))
        # padding continues the positions (it is masked out anyway)
        last = int(position_ids[:, b, :n].max()) + 1 if n else 0
        position_ids[:, b, n:] = np.arange(last, last + L - n)
        spans_rows.append(spans)
    return input_ids, position_ids, segment_ids, vec_mask, vec_chunks, img_order, spans_rows, lengths


def build_inputs(
    rows: list[list[Segment]],
    embed_tokens: torch.nn.Module,
    image_features: list[torch.Tensor] | None,
    grids,
    image_token_id: int,
    pad_id: int,
    merge: int,
) -> Packed:
    """Assemble `rows` into padded input embeddings and 3-D positions (right padding).

    Ids, positions and segment ids are laid out on the host (`grids`: host tensor [n, 3] or
    lists; profiler range ``rematch/pack``) and reach the device in asynchronous copies, so
    building never waits for the device.
    """
    device = embed_tokens.weight.device
    dtype = embed_tokens.weight.dtype
    with record_function("rematch/pack"):
        input_ids, position_ids, segment_ids, vec_mask, vec_chunks, img_order, spans_rows, lengths = _layout(
            rows, image_token_id, pad_id, grid_rows(grids), merge)
    embeds = embed_tokens(to_device(torch.from_numpy(input_ids), device))  # [B, L, d]
    if img_order:
        img_b, img_t = np.nonzero((input_ids == image_token_id) & ~vec_mask)  # image tokens, row-major
        feats = torch.cat([image_features[i] for i in img_order]).to(device, dtype)  # [n_img_tokens, d]
        if img_b.size != feats.shape[0]:
            raise ValueError(f"image tokens ({img_b.size}) and image features ({feats.shape[0]}) do not match")
        embeds = _put(embeds, img_b, img_t, feats)
    if vec_chunks:
        vec_b, vec_t = np.nonzero(vec_mask)
        embeds = _put(embeds, vec_b, vec_t, torch.cat(vec_chunks).to(device, dtype))  # [n_vec, d]
    host = torch.tensor(lengths, dtype=torch.long)
    return Packed(embeds, to_device(torch.from_numpy(position_ids), device),
                  to_device(torch.from_numpy(segment_ids), device), to_device(host, device), spans_rows, lengths)


def _put(embeds: torch.Tensor, rows: np.ndarray, cols: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    """`embeds` [B, L, d] with `values` [n, d] at token positions (rows[i], cols[i]) (differentiable)."""
    idx = to_device(torch.from_numpy(np.stack([rows, cols]).astype(np.int64)), embeds.device)  # [2, n]
    return embeds.index_put((idx[0], idx[1]), values)
