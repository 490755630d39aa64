"""ReMatch as one nn.Module: embedding passes, fusion, contrastive + orthogonality + matching losses.

Everything a training step computes runs inside `ReMatchModel.forward`, so sharded strategies
(FSDP) see a single root module.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from .backbone.model import Backbone
from .backbone.sequence import Ids, Segment, Vecs, build_inputs, grid_rows, n_tokens, to_device
from .fusion import MultiTokenFusion
from .losses import false_negatives, gathered_contrastive_loss, matching_loss, orthogonality_loss
from .matching import MatchingHead, unified_mask

TEMPLATES = ("plain", "chat")


class ReMatchModel(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        k: int = 16,
        token_sets: str = "separate",
        matching: str = "all",
        matching_feature: str = "fused",
        projector_ratio: float = 1.0,
        template: str = "plain",
        temperature: float = 0.02,
        w_orth: float = 0.5,
        w_qdm: float = 0.1,
        orthogonality: bool = True,
        bucket_pass_tokens: float = 2048,
        matching_row_tokens: int = 1024,
        mask_false_negatives: bool = False,
    ):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"embedding.template={template!r}: expected one of {TEMPLATES}")
        if temperature <= 0:
            raise ValueError(f"loss.temperature={temperature}: must be > 0")
        self.backbone = backbone
        emb = backbone.embed_tokens.weight
        self.fusion = MultiTokenFusion(k, backbone.hidden_size, token_sets, init_from=emb)
        self.matching = None
        if matching != "none":
            noise = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(1))
            if emb.is_meta:  # a model on meta (memory planning) has no values to start from
                marker_init = noise
            else:  # parameters are made on the CPU, then moved with the module
                emb = emb.detach().float().cpu()
                marker_init = emb.mean(0, keepdim=True).repeat(2, 1) + emb.std() * noise
            self.matching = MatchingHead(backbone.processor, backbone.hidden_size, matching, matching_feature,
                                         projector_ratio, marker_init)
        if bucket_pass_tokens < 0:
            raise ValueError(f"embedding.bucket_pass_tokens={bucket_pass_tokens}: expected >= 0")
        self.bucket_pass_tokens = bucket_pass_tokens  # embedding passes: rows bucketed by length (length_buckets)
        if matching_row_tokens < 0:
            raise ValueError(f"matching.row_tokens={matching_row_tokens}: expected >= 0 (0: one instance per row)")
        self.matching_row_tokens = matching_row_tokens  # matching rows share one prompt prefix up to this size
        # Sharded training (FSDP, ZeRO-3): the largest value over ranks of an int. Every rank must
        # call the sharded modules equally often (each call gathers their parameters), so ranks
        # agree on the number of embedding passes and on whether the vision tower runs.
        self.max_over_ranks: Callable[[int], int] | None = None
        self.token_counts: dict[str, int] = {}
        self.template = template
        self.temperature = temperature
        self.w_orth = w_orth if orthogonality else 0.0
        self.w_qdm = w_qdm
        # leave in-batch candidates that repeat a query's positive (same text and image) out of its
        # contrastive denominator (`losses.false_negatives`); off: Eq. 3 as written
        self.mask_false_negatives = bool(mask_false_negatives)
        self.chat_prefix, self.chat_suffix = backbone.processor.chat_turn_ids()  # MVQDM++ embedding template

    def _count(self, kind: str, packed) -> None:
        """Token counts of the passes since the last `reset_counts` (throughput and FLOP figures)."""
        c, n = self.token_counts, packed.host_lengths  # host values: counting never waits for the device
        c[kind] = c.get(kind, 0) + sum(n)
        c[f"{kind}_padded"] = c.get(f"{kind}_padded", 0) + packed.segment_ids.numel()
        c[f"{kind}_attn"] = c.get(f"{kind}_attn", 0) + sum(x * x for x in n)

    def reset_counts(self) -> dict:
        out, self.token_counts = dict(self.token_counts), {}
        return out

    # ------------------------------------------------------------------ embedding passes
    @staticmethod
    def contents(side: dict) -> list[Ids]:
        """Collated content batch {ids [N, L], lengths [N], image [N]} -> list of Ids parts."""
        ids = side["ids"].tolist()
        lengths = side["lengths"].tolist()
        images = side["image"].tolist()
        return [Ids(i[:n], None if im < 0 else im) for i, n, im in zip(ids, lengths, images)]

    def embedding_row(self, content: Ids, side: str) -> list[Segment]:
        parts = [content]
        if self.template == "chat":  # MVQDM++: system turn, user turn, open assistant turn
            parts = [Ids(self.chat_prefix), content, Ids(self.chat_suffix)]
        if self.fusion.k == 0:
            parts.append(Ids([self.backbone.processor.eos_id]))  # [EOS] whose state is the embedding
        else:
            parts.append(Vecs(self.fusion.appended(side)))
        return [Segment(parts)]

    def buckets(self, lengths: list[int]) -> list[list[int]]:
        """Rows of one set of passes grouped by length (`length_buckets`); in sharded training as
        many passes on every rank (each pass gathers the sharded modules' parameters)."""
        buckets = length_buckets(lengths, self.bucket_pass_tokens)
        if self.max_over_ranks is not None:
            buckets = length_buckets(lengths, self.bucket_pass_tokens, min_buckets=self.max_over_ranks(len(buckets)))
        return buckets

    def embed(self, groups: list[tuple[str, list[Ids]]], feats, grids) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Backbone passes over several groups of contents (rows are independent).

        groups: [(side, contents)] with side 'qry' | 'doc'. Returns per group (fused [N, d],
        token states [N, K, d]). Rows are sorted by length and run in buckets (see
        `length_buckets`) so that short text documents are not padded to long image queries.
        """
        grids = grid_rows(grids)  # host lists, read once
        rows, sides = [], []
        for side, contents in groups:
            rows += [self.embedding_row(c, side) for c in contents]
            sides += [side] * len(contents)
        bb = self.backbone
        lengths = [n_tokens(r[0].parts) for r in rows]
        states = [None] * len(rows)
        for bucket in self.buckets(lengths):
            packed = build_inputs([rows[i] for i in bucket], bb.embed_tokens, feats, grids, bb.image_token_id,
                                  bb.processor.pad_id, bb.merge)
            self._count("embed", packed)
            hidden = bb(packed, bb.causal_mask(packed))  # [n, L, d]
            for side in dict.fromkeys(sides[i] for i in bucket):  # one gather per side in the bucket
                js = [j for j, i in enumerate(bucket) if sides[i] == side]
                sel = to_device(torch.tensor(js), hidden.device)
                st = self.fusion.token_states(hidden, packed.lengths, side, sel)  # [n_side, K, d]
                for j, s in zip(js, st.unbind(0)):
                    states[bucket[j]] = s  # [K, d]
        out, i = [], 0
        for side, contents in groups:
            st = torch.stack(states[i:i + len(contents)])  # [n, K, d]
            out.append((self.fusion.fuse(st), st))
            i += len(contents)
        return out

    @property
    def vision_frozen(self) -> bool:
        """No trainable weight in the vision tower: its features of an image are the same in every
        pass, so GradCache encodes each image once per step (`mode="images"`)."""
        return not any(p.requires_grad for p in self.backbone.hf.model.visual.parameters())

    def image_features(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower on the batch's images. When ranks must agree (sharded training), a rank
        without images runs it on a blank one, discarded, if any other rank has images."""
        has = int(grids is not None and grids.numel() > 0)
        if self.max_over_ranks is not None and self.max_over_ranks(has) and not has:
            self.backbone.encode_images(*self.backbone.blank_image())
        return self.backbone.encode_images(pixel_values, grids)

    def encode(self, items: dict, pixel_values: torch.Tensor, grid_thw: torch.Tensor, side: str = "qry") -> torch.Tensor:
        """Fused embeddings [N, d] of a collated content batch (inference)."""
        batch = {"items": items, "pixel_values": pixel_values, "image_grid_thw": grid_thw}
        return self(batch, mode="encode", sides=(side,))[side]

    # ------------------------------------------------------------------ matching pass
    def matching_logits(self, q_raw, d1_raw, d2_raw, zq, zd1, zd2, feats, grids, isolate: int | None = None):
        """Yes/No-position logits [B, V, vocab] of the packed (or one isolated) matching pass.

        The packed rows (`MatchingHead.share_prefix`) run in buckets of similar length, as the
        embedding passes do (`length_buckets`): an instance whose documents are short text is
        not padded to one holding images. Rows are independent, so the answers are unchanged."""
        head, bb = self.matching, self.backbone
        impl = bb.hf.config._attn_implementation
        if impl not in ("sdpa", "eager"):  # flash-attention would read the 4-D mask as padding, or fail
            raise ValueError(f"the matching pass needs an attention that honours its unified 4-D mask (sdpa or eager); "
                             f"the backbone was loaded with {impl!r}: load it with backbone.attn_implementation=sdpa "
                             "(training, eval.rerank_top_k, Encoder.score)")
        grids = grid_rows(grids)  # host lists, read once
        instances = [head.instance_segments(q_raw[b], zq[b], {1: d1_raw[b], 2: d2_raw[b]}, {1: zd1[b], 2: zd2[b]},
                                            bb.image_token_id, grids, bb.merge, isolate=isolate)
                     for b in range(len(q_raw))]
        rows, owners = head.share_prefix(instances, self.matching_row_tokens if isolate is None else 0)
        views = head.views if isolate is None else [head.views[isolate]]
        lengths = [sum(n_tokens(s.parts) for s in row) for row in rows]
        answers, order = [], []
        for bucket in self.buckets(lengths):
            local = {r: k for k, r in enumerate(bucket)}  # row -> its index in this pass
            packed = build_inputs([rows[r] for r in bucket], bb.embed_tokens, feats, grids, bb.image_token_id,
                                  bb.processor.pad_id, bb.merge)
            self._count("match", packed)
            mask = unified_mask(packed.segment_ids if isolate is None else _retag(packed.segment_ids, isolate),
                                views, packed.inputs_embeds.dtype)
            hidden = bb(packed, mask)  # [rows, L, d]
            mine = [b for b, (r, _) in enumerate(owners) if r in local]  # the instances of these rows
            row, pos = head.answer_positions(packed.vector_index, [(local[owners[b][0]], owners[b][1]) for b in mine],
                                             len(views))  # [n], [n, V]
            answers.append(hidden[to_device(row, hidden.device).unsqueeze(1), to_device(pos, hidden.device)])
            order += mine
        h = torch.cat(answers)  # [B, V, d], in bucket order
        if order != sorted(order):  # back to instance order
            h = h[to_device(torch.tensor(order).argsort(), h.device)]
        return bb.lm_head(h)  # [B, V, vocab]

    def false_negatives(self, batch: dict, gather: Callable | None, rank: int, device) -> torch.Tensor | None:
        """`losses.false_negatives` of a batch whose sides carry document keys (None without them)."""
        pos_key = batch["pos"].get("key")
        if pos_key is None:
            if self.mask_false_negatives:
                raise ValueError("loss.mask_false_negatives=true needs document keys in the batch (batch['pos']['key'], "
                                 "made by the data pipeline's collator)")
            return None
        neg = batch.get("neg")
        neg_key = neg.get("key") if neg is not None else None
        return false_negatives(to_device(pos_key, device), to_device(neg_key, device) if neg_key is not None else None,
                               gather, rank)

    def draw_slots(self, B: int) -> torch.Tensor:
        """Which slot holds d+ for each instance: [B] bool, True = d1 (uniform, torch RNG)."""
        return torch.rand(B) < 0.5

    def matching_inputs(self, q_raw, pos_raw, neg_raw, eq, ep, en, q_states, p_states, n_states,
                        pos_first: torch.Tensor | None = None, pos_key: torch.Tensor | None = None):
        """Slot assignment (positive in d1 or d2 at random) and projected features."""
        head = self.matching
        B = len(q_raw)
        if neg_raw is None:  # no explicit hard negative: another instance's positive
            perm = other_positive(B, pos_key)
            neg_raw = [pos_raw[i] for i in perm]
            en, n_states = ep[perm], (p_states[perm] if p_states is not None else None)
        src = (q_states, p_states, n_states) if head.feature == "tokens" else (eq, ep, en)
        if head.uses_features:
            zq, zp, zn = (head.projector(x) for x in src)  # [B, d] or [B, K, d]
        else:  # raw views only: features are never read
            zq = zp = zn = eq.new_zeros(B, 1)
        if pos_first is None:
            pos_first = self.draw_slots(B)
        d1_raw = [pos_raw[b] if pos_first[b] else neg_raw[b] for b in range(B)]
        d2_raw = [neg_raw[b] if pos_first[b] else pos_raw[b] for b in range(B)]
        sel = to_device(pos_first, zp.device).view(-1, *([1] * (zp.dim() - 1)))
        zd1 = torch.where(sel, zp, zn)
        zd2 = torch.where(sel, zn, zp)
        labels = torch.tensor([[head.yes_id if (v.slot == 1) == bool(pos_first[b]) else head.no_id
                                for v in head.views] for b in range(B)])
        return q_raw, d1_raw, d2_raw, zq, zd1, zd2, labels

    # ------------------------------------------------------------------ training step
    def forward(self, batch: dict, gather: Callable | None = None, rank: int = 0, mode: str = "loss",
                cache: dict | None = None, sides: tuple[str, ...] = ("qry",)) -> dict[str, torch.Tensor]:
        """Loss terms of one batch of (query, positive, hard negatives) triples (Eq. 5).

        mode="loss": the terms (loss_cl, loss_orth, loss_qdm, matching accuracies and, when the
        batch's sides carry document keys, ``false_negatives``) and their weighted sum ``loss``;
        mode="embed": only the fused embeddings {q [B, d], pos [B, d], neg [B*N, d] | None};
        mode="cached" (GradCache re-forward): ``surrogate`` = <cached grads, embeddings> + this
        chunk's share of the orthogonality and matching losses (see `gradcache`);
        mode="encode": a content batch {items, pixel_values, image_grid_thw} embedded with each
        token set of `sides` ('qry' | 'doc') -> {side: fused [N, d]};
        mode="images": the vision tower alone -> {"image_features": [[n_tokens_i, d]] per image}.
        A batch that carries "image_features" (GradCache's passes over a chunk) skips the tower.
        """
        if mode == "images":
            return {"image_features": self.image_features(batch["pixel_values"], batch["image_grid_thw"])}
        if mode == "encode":
            grids = batch["image_grid_thw"]
            feats = self.image_features(batch["pixel_values"], grids)
            contents = self.contents(batch["items"])
            outs = self.embed([(s, contents) for s in sides], feats, grids)
            return {s: fused for s, (fused, _) in zip(sides, outs)}
        grids = batch["image_grid_thw"]
        feats = batch.get("image_features")  # encoded once for both GradCache passes
        if feats is None:
            with record_function("rematch/vision"):
                feats = self.image_features(batch["pixel_values"], grids)  # once per step, reused by matching
        q_raw, p_raw = self.contents(batch["qry"]), self.contents(batch["pos"])
        neg = batch.get("neg")
        n_raw = self.contents(neg) if neg is not None else None
        groups = [("qry", q_raw), ("doc", p_raw)] + ([("doc", n_raw)] if n_raw else [])
        with record_function("rematch/embed"):
            outs = self.embed(groups, feats, grids)
        (eq, q_states), (ep, p_states) = outs[0], outs[1]
        en, n_states = outs[2] if n_raw else (None, None)
        if mode == "embed":
            return {"q": eq, "pos": ep, "neg": en, "n_rows": sum(len(c) for _, c in groups)}
        B = eq.shape[0]
        N = en.shape[0] // B if n_raw else 0
        terms = {}
        pos_key = batch["pos"].get("key")  # [B] host document keys (the data pipeline's), or None
        if mode == "cached":
            surrogate = (eq * cache["q"]).sum() + (ep * cache["pos"]).sum()  # contrastive gradient, cached
            if n_raw:
                surrogate = surrogate + (en * cache["neg"]).sum()
        else:
            en_b = en.view(B, N, -1) if n_raw else None  # [B, N, d]
            fn = self.false_negatives(batch, gather, rank, eq.device)  # [B, M] or None
            if fn is not None:
                terms["false_negatives"] = fn.sum(1).float().mean()  # candidates repeating the positive, per query
            exclude = fn if self.mask_false_negatives else None
            terms["loss_cl"] = gathered_contrastive_loss(eq, ep, en_b, self.temperature, gather, rank, exclude)
        if self.fusion.k > 1:
            all_states = torch.cat([q_states, p_states] + ([n_states] if n_raw else []))  # [M, K, d]
            terms["loss_orth"] = orthogonality_loss(all_states)
        else:
            terms["loss_orth"] = eq.new_zeros(())
        if mode == "cached":
            terms["loss_orth"] = terms["loss_orth"] * cache["orth_weight"]
            surrogate = surrogate + self.w_orth * terms["loss_orth"]
        if self.matching is not None:
            first = (lambda x: x.view(B, N, *x.shape[1:])[:, 0]) if n_raw else (lambda x: None)  # noqa: E731
            first_neg_raw = [n_raw[b * N] for b in range(B)] if n_raw else None
            mi = self.matching_inputs(q_raw, p_raw, first_neg_raw, eq, ep, first(en) if n_raw else None, q_states,
                                      p_states, first(n_states) if n_raw else None,
                                      pos_first=cache["pos_first"] if cache else None, pos_key=pos_key)
            labels = to_device(mi[-1], eq.device)
            with record_function("rematch/matching"):
                logits = self.matching_logits(*mi[:-1], feats, grids)  # [B, V, vocab]
            terms["loss_qdm"] = matching_loss(logits, labels)
            # integer indices (views of the logits): a list index would be copied to the device
            # from pageable memory, which waits for the device mid-step
            pred_yes = logits[..., self.matching.yes_id] > logits[..., self.matching.no_id]  # [B, V]
            correct = (pred_yes == (labels == self.matching.yes_id)).float()  # [B, V]
            for v, view in enumerate(self.matching.views):
                terms[f"acc_{view.name}"] = correct[:, v].mean().detach()
            terms["acc_qdm"] = correct.mean().detach()
            if mode == "cached":
                terms["loss_qdm"] = terms["loss_qdm"] * cache["qdm_weight"]
                surrogate = surrogate + self.w_qdm * terms["loss_qdm"]
        if mode == "cached":
            terms["surrogate"] = surrogate
            return terms
        loss = terms["loss_cl"] + self.w_orth * terms["loss_orth"]
        if self.matching is not None:
            loss = loss + self.w_qdm * terms["loss_qdm"]
        terms["loss"] = loss
        return terms


def other_positive(B: int, pos_key: torch.Tensor | None = None) -> list[int]:
    """For each instance, the instance whose positive serves as its d- when it has no explicit hard
    negative: the previous one (cyclically, as ``torch.roll(arange(B), 1)``), skipping positives
    with its own key (the same document: a "No" for its own positive would contradict the "Yes");
    the previous one when all share it."""
    if pos_key is None:
        return [(b - 1) % B for b in range(B)]  # torch.roll(arange(B), 1)
    keys = pos_key.tolist()  # host keys: no device read
    out = []
    for b in range(B):
        c = next((c % B for c in range(b - 1, b - B, -1) if keys[c % B] != keys[b]), (b - 1) % B)
        out.append(c)
    return out


def length_buckets(lengths: list[int], pass_tokens: float = 2048, min_buckets: int = 1) -> list[list[int]]:
    """Row indices grouped into buckets of similar length (longest first), at the least cost.

    A bucket costs its padded size (rows x its longest row, the token positions a pass computes)
    plus `pass_tokens`, the fixed cost of one more pass through the backbone (kernel launches and
    host work, in token equivalents). Over the rows sorted by length, where an optimal partition
    is a run of consecutive rows per bucket, the cheapest partition is found exactly by dynamic
    programming (O(rows^2), vectorised). `pass_tokens=0`: no padding at all; `inf`: one bucket.
    With `min_buckets`, the largest buckets are halved until there are that many (sharded
    training: every rank must run as many passes).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    if math.isinf(pass_tokens):
        buckets = [order]
    else:
        L = np.array([lengths[i] for i in order], dtype=np.float64)  # [n], longest first
        first = np.arange(n)
        best = np.zeros(n + 1)  # best[i]: cost of the first i rows
        start = np.zeros(n + 1, dtype=np.int64)  # where the last bucket of that optimum starts
        for i in range(1, n + 1):
            cost = best[:i] + (i - first[:i]) * L[:i] + pass_tokens  # last bucket = rows j..i-1, padded to L[j]
            start[i] = j = int(np.argmin(cost))  # ties: the earliest start, i.e. fewer buckets
            best[i] = cost[j]
        buckets, i = [], n
        while i > 0:
            buckets.append(order[start[i]:i])
            i = int(start[i])
        buckets.reverse()
    while len(buckets) < min(min_buckets, len(lengths)):
        j = max(range(len(buckets)), key=lambda b: len(buckets[b]))  # split the largest (rows stay sorted)
        half = (len(buckets[j]) + 1) // 2
        buckets[j:j + 1] = [buckets[j][:half], buckets[j][half:]]
    return buckets


def _retag(segment_ids: torch.Tensor, isolate: int) -> torch.Tensor:
    """In an isolated pass the single answer has tag A_TAG0 + isolate; map it to A_TAG0."""
    from .matching import A_TAG0

    out = segment_ids.clone()
    out[out == A_TAG0 + isolate] = A_TAG0
    return out
