"""Multi-View Query-Document Matching (Sec. 3.2.3, prompt of S7), all views in ONE forward pass.

Per instance one packed sequence holds the segments

    P | Qr Qf | D1r D1f D2r D2f | A_1 ... A_V

``P``: system turn + instruction (the S7 prompt); ``Qr``/``Qf``: the query as raw content or as
its projected feature between <feat_start>/<feat_end>; ``D1*``/``D2*``: the two document slots
(the positive sits in d1 or d2 at random per instance); ``A_v``: the answer prefix of view v
(closing the user turn, opening the assistant turn and ``<ANSWER>``), whose last token
predicts "Yes"/"No".

Unified mask: P is causal on itself; each content segment sees P and itself (causally); answer
v sees P, its own query view, its own document view and itself. Positions: all query views
start right after P, all document views after the longest query view, and each answer right
after its own document view; so every answer is computed exactly as in an isolated pass holding
only P, its query view, its document view and itself at the same positions (tested), and nothing
in it depends on the other slot's document, not even through positions (tested: lengthening d2
leaves every d1 answer unchanged). A single start for all answers (after the longest document, as
`method.md` reads the paper) would let a d1 answer tell from its RoPE distance whether d2 is
longer than d1: a label shortcut whenever d+ and d- differ in length.

P is the same for every instance, so consecutive instances share a row holding P once
(`MatchingHead.share_prefix`, up to ``matching.row_tokens`` tokens): each instance keeps its
positions and sees only P and its own segments (segment ids carry the instance's slot in the
row, `instance_tag`), so its answers equal those of a row of its own (tested, gradients too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbone.sequence import Ids, Segment, Vecs, n_tokens, segment_span, to_device

INSTRUCTION = (
    'Compare the content inside <QUERY> and <DOC>. Determine whether the information in <DOC> is '
    'relevant to the query in <QUERY>. Answer only with "Yes" or "No", and wrap your answer in '
    "<ANSWER></ANSWER> tags."
)
SYSTEM = "You are a helpful assistant."
# The S7 prompt's pieces around the raw / feature content. Each piece is tokenised alone, so a
# space goes at the start of the next piece, where a BPE joins it to the word (" <QUERY>"), not
# at the end of the previous one (a lone " " token the pretrained model rarely saw; tested with
# Qwen2's tokenizer: the pieces give the ids of the joined prompt).
Q_OPEN, Q_CLOSE = " <QUERY> ", " </QUERY>\n"
D_OPEN, D_CLOSE = "<DOC> ", " </DOC>\n"

# Table 5 names -> (query views, document views); each pair is used for both document slots.
VIEW_SETS = {
    "all": (("raw", "feat"), ("raw", "feat")),
    "feat_feat": (("feat",), ("feat",)),
    "raw_raw": (("raw",), ("raw",)),
    "raw_feat": (("raw",), ("feat",)),
    "feat_raw": (("feat",), ("raw",)),
    "none": ((), ()),
}

# segment tags
P_TAG = 0
Q_TAG = {"raw": 1, "feat": 2}
D_TAG = {(1, "raw"): 3, (1, "feat"): 4, (2, "raw"): 5, (2, "feat"): 6}
A_TAG0 = 7


@dataclass(frozen=True)
class View:
    query: str  # "raw" | "feat"
    slot: int  # 1 | 2
    doc: str  # "raw" | "feat"

    @property
    def name(self) -> str:
        return f"q{self.query}_d{self.slot}{self.doc}"


def views_for(name: str) -> list[View]:
    """The views of a `matching=` setting, in the S7 order (ans1 ans1 ans2 ans2 per query view)."""
    if name not in VIEW_SETS:
        raise ValueError(f"matching.views={name!r}: expected one of {sorted(VIEW_SETS)}")
    qs, ds = VIEW_SETS[name]
    return [View(q, s, d) for q in qs for s in (1, 2) for d in ds]


def reads_features(name: str) -> bool:
    """Does the `matching=` setting `name` read projected features (so it has a projector and the
    <feat_start>/<feat_end> markers)?"""
    return any("feat" in (v.query, v.doc) for v in views_for(name))


def allowed_tags(views: list[View]) -> torch.Tensor:
    """[T, T] bool: may a token of segment tag a attend to a token of segment tag b (causality aside)."""
    T = A_TAG0 + len(views)
    allow = torch.zeros(T, T, dtype=torch.bool)
    allow[:, P_TAG] = True
    allow.fill_diagonal_(True)
    for v, view in enumerate(views):
        a = A_TAG0 + v
        allow[a, Q_TAG[view.query]] = True
        allow[a, D_TAG[(view.slot, view.doc)]] = True
    return allow


def instance_tag(tag: int, slot: int, views: list[View]) -> int:
    """Segment id of `tag` for the instance in position `slot` of a shared-prefix row."""
    return slot * (A_TAG0 + len(views)) + tag


def unified_mask(segment_ids: torch.Tensor, views: list[View], dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [B, 1, L, L] (0 = attend, finfo.min = blocked) of the packed pass.

    segment_ids: [B, L] segment id of each token (`instance_tag`: the segment's tag and the
    instance's slot in the row), -1 on padding (padding attends to itself only, so no row is
    fully masked). Tokens of different instances never see each other, except the shared P.
    """
    B, L = segment_ids.shape
    allow_tab = to_device(allowed_tags(views), segment_ids.device)  # [T, T]
    pad = segment_ids < 0  # [B, L]
    ids = segment_ids.clamp(min=0)
    tags, slots = ids % allow_tab.shape[0], ids // allow_tab.shape[0]  # [B, L] each
    same = (slots.unsqueeze(2) == slots.unsqueeze(1)) | (tags == P_TAG).unsqueeze(1)  # [B, L, L]
    allowed = allow_tab[tags.unsqueeze(2), tags.unsqueeze(1)] & same  # [B, L, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()  # [L, L]
    allowed = allowed & causal & ~pad.unsqueeze(1) & ~pad.unsqueeze(2)
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=segment_ids.device)  # keep a diagonal
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)


class Projector(nn.Module):
    """Lightweight MLP mapping a fused embedding into the LLM input space: [.., d] -> [.., d]."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 1.0):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.net = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 weights (like the other ReMatch modules) on a bf16 backbone: compute in the
        # projector's dtype, return in the backbone's
        return self.net(x.to(self.net[0].weight.dtype)).to(x.dtype)


class MatchingHead(nn.Module):
    """Projector, <feat_start>/<feat_end> marker embeddings and the prompt pieces of the matching pass."""

    def __init__(self, processor, hidden_size: int, views: str = "all", feature: str = "fused",
                 mlp_ratio: float = 1.0, marker_init: torch.Tensor | None = None):
        super().__init__()
        if feature not in ("fused", "tokens"):
            raise ValueError(f"matching.feature={feature!r}: expected 'fused' or 'tokens'")
        self.views = views_for(views)
        self.feature = feature
        self.uses_features = reads_features(views)
        self.projector = self.markers = None
        if self.uses_features:  # raw-only views train no projector (and DDP sees no unused parameters)
            self.projector = Projector(hidden_size, mlp_ratio)
            init = marker_init.detach().float().clone() if marker_init is not None else torch.randn(2, hidden_size) * 0.02
            self.markers = nn.Parameter(init)  # [2, d]: <feat_start>, <feat_end>
        tok = processor.tokenize
        user_prefix, assistant_prefix = processor.chat_turn_ids(SYSTEM)
        self.prefix_ids = user_prefix + tok(INSTRUCTION)
        self.answer_ids = assistant_prefix + tok("<ANSWER>")
        self.q_open, self.q_close = tok(Q_OPEN), tok(Q_CLOSE)
        self.d_open, self.d_close = tok(D_OPEN), tok(D_CLOSE)
        yes, no = tok("Yes"), tok("No")
        if len(yes) != 1 or len(no) != 1:
            raise ValueError(f"'Yes'/'No' must be single tokens for the matching loss, got {yes} / {no}")
        self.yes_id, self.no_id = yes[0], no[0]

    # ---------------------------------------------------------------- layout
    def _raw(self, open_ids, content: Ids, close_ids) -> list:
        return [Ids(open_ids), content, Ids(close_ids)]

    def _feat(self, open_ids, feat: torch.Tensor, close_ids) -> list:
        z = feat if feat.dim() == 2 else feat.unsqueeze(0)  # [n, d]
        vecs = torch.cat([self.markers[:1].to(z.dtype), z, self.markers[1:].to(z.dtype)])  # [n + 2, d]
        return [Ids(open_ids), Vecs(vecs), Ids(close_ids)]

    def instance_segments(self, q_raw: Ids, q_feat: torch.Tensor, d_raw: dict, d_feat: dict, image_token_id: int,
                          grids, merge: int, isolate: int | None = None) -> list[Segment]:
        """Segments of one packed matching sequence.

        q_feat: projected query feature [d] or [K, d]; d_raw / d_feat: {slot: Ids / tensor}.
        `isolate=v` keeps only P, view v's query and document segments and answer v, at the
        positions they have in the full packed sequence (the reference for the equivalence test).
        """
        used_q = sorted({v.query for v in self.views})
        used_d = sorted({(v.slot, v.doc) for v in self.views})
        P = Segment([Ids(self.prefix_ids)], 0, P_TAG)
        qsegs = {q: Segment(self._raw(self.q_open, q_raw, self.q_close) if q == "raw"
                            else self._feat(self.q_open, q_feat, self.q_close), 0, Q_TAG[q]) for q in used_q}
        dsegs = {sd: Segment(self._raw(self.d_open, d_raw[sd[0]], self.d_close) if sd[1] == "raw"
                             else self._feat(self.d_open, d_feat[sd[0]], self.d_close), 0, D_TAG[sd]) for sd in used_d}
        span = lambda s: segment_span(s, image_token_id, grids, merge)  # noqa: E731
        q_start = span(P)
        d_start = q_start + max(span(s) for s in qsegs.values())
        for s in qsegs.values():
            s.start = q_start
        for s in dsegs.values():
            s.start = d_start
        # each answer starts right after its own document view: a shared start (after the longest
        # document) would tell an answer, through the RoPE distance, whether the document it cannot
        # see is longer than its own, i.e. leak which slot holds the longer of d+ and d-
        answers = [Segment([Ids(self.answer_ids)], d_start + span(dsegs[(v.slot, v.doc)]), A_TAG0 + i)
                   for i, v in enumerate(self.views)]
        if isolate is not None:
            v = self.views[isolate]
            return [P, qsegs[v.query], dsegs[(v.slot, v.doc)], answers[isolate]]
        return [P, *qsegs.values(), *dsegs.values(), *answers]

    def share_prefix(self, instances: list[list[Segment]], budget: int) -> tuple[list[list[Segment]], list]:
        """Pack instances (each ``[P, ...]`` from `instance_segments`) into rows that share one P.

        Consecutive instances join a row while it holds at most `budget` tokens (always at least
        one; `budget=0`: one instance per row). An instance keeps its positions (they start after
        P in every slot) and sees only P and itself (`unified_mask`), so its answers are computed
        as in a row of its own; P is computed once per row instead of once per instance.
        Returns the rows and, per instance, (row, index of its first answer segment).
        """
        n_views = sum(1 for s in instances[0] if s.tag >= A_TAG0) if instances else 0
        rows, owners, size, slot = [], [], 0, 0
        for segs in instances:
            n = sum(n_tokens(s.parts) for s in segs[1:])
            if not rows or budget <= 0 or size + n > budget:
                rows.append([segs[0]])
                size, slot = n_tokens(segs[0].parts), -1
            slot += 1
            for s in segs[1:]:
                s.tag = instance_tag(s.tag, slot, self.views)
            owners.append((len(rows) - 1, len(rows[-1]) + len(segs) - 1 - n_views))
            rows[-1] += segs[1:]
            size += n
        return rows, owners

    @staticmethod
    def answer_positions(packed_spans: list, owners: list, n_answers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row [B], token index [B, V]) of the last token of each instance's answer segments."""
        rows = torch.tensor([r for r, _ in owners])
        pos = torch.tensor([[packed_spans[r][a + v][1] - 1 for v in range(n_answers)] for r, a in owners])
        return rows, pos

