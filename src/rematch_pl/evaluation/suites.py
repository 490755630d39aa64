"""The two evaluation suites on top of the encoding engine.

* `eval_mmeb_subset`: one MMEB-eval subset (`EvalSet`): queries encoded with the query token set,
  candidates with the document token set, each query scored against its own candidate list, strict
  Hit@1 / Hit@5 / MRR; optional reranking of the top N by the matching head.
* `eval_retrieval` / `eval_choices`: the zero-shot sets (`rematch_pl.zeroshot`): full-pool
  Recall@1/5/10 in both directions (captions with identical texts are one item:
  `RetrievalSet.positives`), SugarCrepe accuracy.

Only rank 0 scores (it holds the gathered embeddings); the other ranks encode and return None.
"""

from __future__ import annotations

import time

import torch

from .engine import Engine, Request
from .metrics import evaluate_subset, pool_ranks, positive_rank, recall_from_ranks

DEFAULT_PROMPTS = {
    # MMEB-eval's MSCOCO_t2i / MSCOCO_i2t instructions
    "t2i_query": "Find me an everyday image that matches the given caption: {text}",
    "image_doc": "<|image_1|>\nRepresent the given image.",
    "i2t_query": "<|image_1|>\nFind an image caption describing the given everyday image.",
    "text_doc": "{text}",
}


def eval_mmeb_subset(engine: Engine, es, rerank_top_k: int = 0, rerank_batch_size: int = 8,
                     rerank_max_queries: int | None = None, device=None) -> dict | None:
    """Metrics of one `EvalSet` (None on ranks > 0)."""
    t0 = time.perf_counter()
    cand_items = sorted({c for cs in es.candidates for c in cs})  # only candidates need a document embedding
    column = {item: j for j, item in enumerate(cand_items)}
    reqs = ([Request(es.items[i][0], es.image_file(i), "qry", es.items[i][1] or None) for i in es.queries]
            + [Request(es.items[i][0], es.image_file(i), "doc", es.items[i][1] or None) for i in cand_items])
    enc_before = engine.stats["encoded"]
    emb = engine.encode(reqs, desc=es.subset)
    if emb is None:
        return None
    nq = len(es.queries)
    q, docs = emb[:nq], emb[nq:]
    t1 = time.perf_counter()
    m, scores, valid = evaluate_subset(q, docs, [[column[c] for c in cs] for cs in es.candidates], return_scores=True,
                                       device=device)
    out = {"subset": es.subset, **m, "queries": nq, "items": len(es.items),
           "candidates_per_query": round(sum(len(c) for c in es.candidates) / nq, 2),
           "encoded": engine.stats["encoded"] - enc_before, "encode_s": round(t1 - t0, 3),
           "score_s": round(time.perf_counter() - t1, 3)}
    if rerank_top_k and rerank_top_k > 0:
        from .rerank import rerank_subset

        r = rerank_subset(engine.model, es, scores, valid, es.candidates, rerank_top_k,
                          max_length=engine.max_length, batch_size=rerank_batch_size, max_queries=rerank_max_queries)
        out["rerank"] = r
    return out


def _doc_text(template: str, text: str, instruction: str | None, has_image: bool) -> str:
    from rematch_pl.data.mmeb import apply_target_instruction

    return apply_target_instruction(template.format(text=text), has_image, instruction)


def _instructions(target_instruction, subsets: dict) -> dict:
    """Document instructions of the image and text documents, from the checkpoint's table."""
    from rematch_pl.data.mmeb import resolve_target_instructions, target_instruction_for

    table = resolve_target_instructions(target_instruction)
    return {"image": target_instruction_for(table, subsets.get("image_doc", "MSCOCO_t2i"), True),
            "text": target_instruction_for(table, subsets.get("text_doc", "MSCOCO_i2t"), False)}


def eval_retrieval(engine: Engine, rs, prompts: dict | None = None, target_instruction=None,
                   instruction_subsets: dict | None = None, backend: str = "torch", device=None,
                   ks=(1, 5, 10), chunk: int = 65536) -> dict | None:
    """Text->image and image->text Recall@k (percent) of a `RetrievalSet` over its whole pools."""
    p = dict(DEFAULT_PROMPTS, **(prompts or {}))
    ins = _instructions(target_instruction, instruction_subsets or {})
    t0 = time.perf_counter()
    caps, n_img = rs.captions, len(rs.images)
    img = [rs.image_file(i) for i in range(n_img)]
    reqs = ([Request(p["t2i_query"].format(text=c), None, "qry") for c in caps]
            + [Request(_doc_text(p["image_doc"], "", ins["image"], True), img[i], "doc", rs.images[i])
               for i in range(n_img)]
            + [Request(p["i2t_query"].format(text=""), img[i], "qry", rs.images[i]) for i in range(n_img)]
            + [Request(_doc_text(p["text_doc"], c, ins["text"], False), None, "doc") for c in caps])
    enc_before = engine.stats["encoded"]
    emb = engine.encode(reqs, desc=rs.name)
    if emb is None:
        return None
    nc = len(caps)
    q_t, d_i, q_i, d_t = emb[:nc], emb[nc:nc + n_img], emb[nc + n_img:nc + 2 * n_img], emb[nc + 2 * n_img:]
    t1 = time.perf_counter()
    kw = dict(backend=backend, device=device, chunk=chunk, max_k=max(ks))
    caption_pos, image_pos = rs.positives()  # identical caption texts: one item
    t2i = pool_ranks(q_t, d_i, caption_pos, **kw)
    i2t = pool_ranks(q_i, d_t, image_pos, **kw)
    return {"set": rs.name, "t2i": recall_from_ranks(t2i, ks), "i2t": recall_from_ranks(i2t, ks),
            "chance@1": {"t2i": 100.0 * sum(map(len, caption_pos)) / nc / n_img,
                         "i2t": 100.0 * sum(map(len, image_pos)) / nc / n_img},
            "images": n_img, "captions": nc, "encoded": engine.stats["encoded"] - enc_before,
            "encode_s": round(t1 - t0, 3), "score_s": round(time.perf_counter() - t1, 3)}


def eval_choices(engine: Engine, parts: list, prompts: dict | None = None, target_instruction=None,
                 instruction_subsets: dict | None = None) -> dict | None:
    """SugarCrepe: accuracy (percent) of the positive caption scoring strictly above its hard negative."""
    p = dict(DEFAULT_PROMPTS, **(prompts or {}))
    ins = _instructions(target_instruction, instruction_subsets or {})
    t0 = time.perf_counter()
    reqs, layout = [], []
    for cs in parts:
        n = len(cs.images)
        start = len(reqs)
        reqs += [Request(p["i2t_query"].format(text=""), cs.image_file(i), "qry", cs.images[i]) for i in range(n)]
        reqs += [Request(_doc_text(p["text_doc"], c, ins["text"], False), None, "doc") for c in cs.positives]
        reqs += [Request(_doc_text(p["text_doc"], c, ins["text"], False), None, "doc") for c in cs.negatives]
        layout.append((cs.name, start, n))
    enc_before = engine.stats["encoded"]
    emb = engine.encode(reqs, desc="sugarcrepe")
    if emb is None:
        return None
    out = {"set": "sugarcrepe", "parts": {}}
    for name, s, n in layout:
        q, pos, neg = emb[s:s + n], emb[s + n:s + 2 * n], emb[s + 2 * n:s + 3 * n]
        qn = torch.nn.functional.normalize(q, dim=-1)
        sp = (qn * torch.nn.functional.normalize(pos, dim=-1)).sum(-1)
        sn = (qn * torch.nn.functional.normalize(neg, dim=-1)).sum(-1)
        rank = positive_rank(torch.stack([sp, sn], dim=1))  # strict: a tie is wrong
        out["parts"][name] = {"accuracy": 100.0 * (rank < 1).float().mean().item(), "n": n}
    for group in ("replace", "swap", "add"):
        accs = [v["accuracy"] for k, v in out["parts"].items() if k.startswith(group)]
        if accs:
            out[group] = sum(accs) / len(accs)
    out.update(encoded=engine.stats["encoded"] - enc_before, encode_s=round(time.perf_counter() - t0, 3),
               chance=50.0)
    return out
