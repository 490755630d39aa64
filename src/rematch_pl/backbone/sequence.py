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

import torch


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


def n_tokens(parts: list) -> int:
    """Number of tokens a list of parts (`Ids`, `Vecs`) occupies in a row."""
    return sum(p.vectors.shape[0] if isinstance(p, Vecs) else len(p.ids) for p in parts)


def segment_positions(seg: Segment, image_token_id: int, grids: torch.Tensor | None, merge: int) -> tuple[torch.Tensor, int]:
    """3-D positions [3, n] of one segment and the next free position (both including `seg.start`)."""
    pos = []
    cur = seg.start
    for part in seg.parts:
        if isinstance(part, Vecs):
            n = part.vectors.shape[0]
            pos.append(torch.arange(cur, cur + n).expand(3, n))
            cur += n
            continue
        ids = torch.as_tensor(part.ids)
        if part.image is None:
            n = ids.numel()
            pos.append(torch.arange(cur, cur + n).expand(3, n))
            cur += n
            continue
        is_img = ids == image_token_id
        idx = torch.nonzero(is_img).flatten()
        s, e = int(idx[0]), int(idx[-1]) + 1
        t, h, w = (int(x) for x in grids[part.image])
        gh, gw = h // merge, w // merge
        if e - s != t * gh * gw:
            raise ValueError(f"image block has {e - s} tokens but its grid {t}x{h}x{w} needs {t * gh * gw}")
        pos.append(torch.arange(cur, cur + s).expand(3, s))
        cur += s
        tt = torch.arange(t).view(-1, 1, 1).expand(t, gh, gw).reshape(-1)
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).reshape(-1)
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).reshape(-1)
        pos.append(torch.stack([tt + cur, hh + cur, ww + cur]))
        cur += max(gh, gw)
        rest = ids.numel() - e
        pos.append(torch.arange(cur, cur + rest).expand(3, rest))
        cur += rest
    if not pos:
        return torch.zeros(3, 0, dtype=torch.long), cur
    return torch.cat(pos, dim=1).long(), cur


def segment_span(seg: Segment, image_token_id: int, grids: torch.Tensor | None, merge: int) -> int:
    """Number of positions a segment occupies when it starts at 0."""
    shifted = Segment(seg.parts, start=0, tag=seg.tag)
    return segment_positions(shifted, image_token_id, grids, merge)[1]


def build_inputs(
    rows: list[list[Segment]],
    embed_tokens: torch.nn.Module,
    image_features: list[torch.Tensor] | None,
    grids: torch.Tensor | None,
    image_token_id: int,
    pad_id: int,
    merge: int,
) -> Packed:
    """Assemble `rows` into padded input embeddings and 3-D positions (right padding)."""
    device = embed_tokens.weight.device
    dtype = embed_tokens.weight.dtype
    ids_rows, pos_rows, seg_rows, spans_rows = [], [], [], []
    vec_chunks: list[torch.Tensor] = []  # vectors in row-major token order
    img_order: list[int] = []  # images in row-major token order
    vec_masks = []
    for row in rows:
        ids, pos, segs, vmask, spans = [], [], [], [], []
        n = 0
        for seg in row:
            p, _ = segment_positions(seg, image_token_id, grids, merge)
            pos.append(p)
            start = n
            for part in seg.parts:
                if isinstance(part, Vecs):
                    k = part.vectors.shape[0]
                    ids.append(torch.full((k,), pad_id, dtype=torch.long))
                    vmask.append(torch.ones(k, dtype=torch.bool))
                    vec_chunks.append(part.vectors)
                else:
                    t = torch.as_tensor(part.ids, dtype=torch.long).cpu()
                    k = t.numel()
                    ids.append(t)
                    vmask.append(torch.zeros(k, dtype=torch.bool))
                    if part.image is not None:
                        img_order.append(part.image)
                n += k
            segs.append(torch.full((n - start,), seg.tag, dtype=torch.long))
            spans.append((start, n))
        ids_rows.append(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long))
        pos_rows.append(torch.cat(pos, dim=1))
        seg_rows.append(torch.cat(segs))
        vec_masks.append(torch.cat(vmask))
        spans_rows.append(spans)
    lengths = torch.tensor([r.numel() for r in ids_rows])
    B, L = len(rows), int(lengths.max())
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(3, B, L, dtype=torch.long)
    segment_ids = torch.full((B, L), -1, dtype=torch.long)
    vec_mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        input_ids[b, :n] = ids_rows[b]
        position_ids[:, b, :n] = pos_rows[b]
        # padding continues the positions (it is masked out anyway)
        last = int(pos_rows[b].max()) + 1 if n else 0
        position_ids[:, b, n:] = torch.arange(last, last + L - n)
        segment_ids[b, :n] = seg_rows[b]
        vec_mask[b, :n] = vec_masks[b]
    img_mask = (input_ids == image_token_id) & ~vec_mask  # [B, L], checked on the host (no device read)
    input_ids = input_ids.to(device)
    embeds = embed_tokens(input_ids)  # [B, L, d]
    if img_order:
        feats = torch.cat([image_features[i] for i in img_order]).to(device, dtype)  # [n_img_tokens, d]
        if int(img_mask.sum()) != feats.shape[0]:
            raise ValueError(f"image tokens ({int(img_mask.sum())}) and image features ({feats.shape[0]}) do not match")
        embeds = embeds.masked_scatter(img_mask.to(device).unsqueeze(-1), feats)
    if vec_chunks:
        vecs = torch.cat(vec_chunks).to(device, dtype)  # [n_vec, d]
        embeds = embeds.masked_scatter(vec_mask.to(device).unsqueeze(-1), vecs)
    return Packed(embeds, position_ids.to(device), segment_ids.to(device), lengths.to(device), spans_rows,
                  lengths.tolist())
