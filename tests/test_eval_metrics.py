"""Evaluation building blocks without a model: strict metrics, scoring paths, FAISS option, cache, batching, tables."""

import sys

import pytest
import torch
import torch.nn.functional as F

from rematch_pl.evaluation import evaluate_subset, pool_ranks, positive_rank, retrieval_metrics
from rematch_pl.evaluation.cache import EmbeddingCache, image_identity, item_key
from rematch_pl.evaluation.engine import make_batches
from rematch_pl.evaluation.metrics import (NO_RANK, candidate_scores, metrics_from_ranks, pad_candidates,
                                           recall_from_ranks)
from rematch_pl.evaluation.tables import MMEB_SUBSETS, markdown, subset_info, table1, table2


# ---------------------------------------------------------------- strict ranks
def test_ties_and_nans_never_count_for_the_positive():
    s = torch.tensor([[0.5, 0.5, 0.1], [0.9, 0.1, 0.2], [float("nan"), 0.1, 0.2], [0.3, float("nan"), 0.1]])
    assert positive_rank(s).tolist() == [1, 0, NO_RANK, 1]  # a NaN positive: a miss at every k
    equal = torch.ones(7, 12)  # a collapsed model: every score equal
    m = retrieval_metrics(equal)
    assert m["hit@1"] == 0.0 and m["hit@5"] == 0.0  # upstream's argmax would give 100%


def test_a_nan_positive_is_never_a_hit():
    """A NaN positive is a miss at every k and adds nothing to MRR, with competitors or without
    (alone in its list, or beside a copy of itself only), in candidate lists and in pools."""
    nan = float("nan")
    for s, v in ((torch.tensor([[nan]]), None), (torch.tensor([[nan, 0.3]]), torch.tensor([[True, False]])),
                 (torch.tensor([[nan, 0.1, 0.2]]), None)):
        m = metrics_from_ranks(positive_rank(s, v), ks=(1, 5, 100))
        assert m == {"hit@1": 0.0, "hit@5": 0.0, "hit@100": 0.0, "mrr": 0.0}, (s, v)
    q = torch.tensor([[nan, 0.0], [1.0, 0.0]])
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for kw in ({"backend": "torch"}, {"backend": "faiss", "max_k": 10}):
        r = pool_ranks(q, pool, [[0, 1], [0]], **kw)  # query 0: NaN scores, every pool entry its positive
        assert recall_from_ranks(r, ks=(1, 5, 10)) == {"R@1": 50.0, "R@5": 50.0, "R@10": 50.0}, kw


def test_duplicate_positive_and_ragged_lists():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05]])
    cands = [[0, 1, 0], [2, 3]]  # query 0 lists its positive item twice: not a competitor
    m, scores, valid = evaluate_subset(q, docs, cands, return_scores=True)
    assert m["hit@1"] == 1.0
    assert valid.tolist() == [[True, True, False], [True, True]+[False]]
    assert m["chance@1"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_a_negative_listed_twice_competes_once():
    """The same item listed again is one competitor: Hit@5 and MRR see it once, and so does chance."""
    q = torch.tensor([[1.0, 0.0]])
    docs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    m, _, valid = evaluate_subset(q, docs, [[0, 1, 1, 1, 1, 1, 2]], return_scores=True)
    assert valid.tolist() == [[True, True, False, False, False, False, True]]
    assert m["hit@1"] == 0.0 and m["hit@5"] == 1.0 and m["mrr"] == pytest.approx(0.5)
    assert m["chance@1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n_docs", [6, 400])  # few documents: product + gather; many: batched gather
def test_candidate_scores_paths_equal_brute_force(n_docs):
    g = torch.Generator().manual_seed(0)
    q, docs = torch.randn(9, 16, generator=g), torch.randn(n_docs, 16, generator=g)
    cands = [torch.randperm(n_docs, generator=g)[: 3 + i % 3].tolist() for i in range(9)]
    idx, valid = pad_candidates(cands)
    got = candidate_scores(q, docs, idx, block=4)
    qn, dn = F.normalize(q, dim=-1), F.normalize(docs, dim=-1)
    for i, c in enumerate(cands):
        torch.testing.assert_close(got[i, : len(c)], dn[c] @ qn[i], atol=1e-6, rtol=1e-5)


def _brute_pool_ranks(q, pool, positives):
    s = F.normalize(q, dim=-1) @ F.normalize(pool, dim=-1).T
    out = []
    for i, pos in enumerate(positives):
        best = s[i, pos].max()
        neg = torch.ones(pool.shape[0], dtype=torch.bool)
        neg[pos] = False
        out.append(int((s[i][neg] >= best).sum()))
    return torch.tensor(out)


def test_pool_ranks_streamed_equal_brute_force_with_ties():
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(50, 8, generator=g)
    pool[10] = pool[3]  # an exact duplicate of a positive: a tie that must count against it
    q = torch.randn(12, 8, generator=g)
    positives = [[3]] + [torch.randperm(50, generator=g)[: 1 + i % 5].tolist() for i in range(11)]
    got = pool_ranks(q, pool, positives, chunk=7, block=5)
    assert got.tolist() == _brute_pool_ranks(q, pool, positives).tolist()
    assert pool_ranks(torch.ones(3, 8), torch.ones(20, 8), [[0], [1], [2]]).tolist() == [19, 19, 19]
    r = recall_from_ranks(torch.tensor([0, 4, 9, 10]))
    assert r == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}


def test_faiss_option_matches_torch_below_max_k():
    """The real FAISS exact inner-product index (faiss-cpu, installed with the dev extra) against the
    streamed torch ranks: equal below max_k, max_k above, ties (a duplicated positive) strict in both."""
    import faiss  # noqa: F401  (a missing package fails here: never a silent skip)

    g = torch.Generator().manual_seed(2)
    pool, q = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    pool[5] = pool[0]  # an exact duplicate of query 0's positive
    pool[7] = pool[1]  # and of a positive that shares a query with other positives
    positives = [[0]] + [[1, 9]] + [torch.randperm(300, generator=g)[: 1 + i % 5].tolist() for i in range(38)]
    for i in range(3, 30):  # noisy copies of a positive: ranks from 0 to deep
        q[i] = pool[positives[i][0]] + (i - 3) / 8 * torch.randn(16, generator=g)
    q[0] = pool[0]  # its positive and the duplicate tie at the top: rank 1, not 0
    q[2] = pool[200]  # a query whose nearest pool entry is a non-positive: rank >= 1
    exact = pool_ranks(q, pool, positives, backend="torch", chunk=64, block=16)
    assert exact[0] == 1 and (exact >= 10).any() and (exact < 10).sum() >= 5  # ties, deep and shallow ranks
    for max_k in (1, 10):
        fa = pool_ranks(q, pool, positives, backend="faiss", max_k=max_k)
        assert fa.tolist() == torch.clamp(exact, max=max_k).tolist()
    assert recall_from_ranks(pool_ranks(q, pool, positives, backend="faiss")) == recall_from_ranks(exact)


def test_faiss_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match="eval.scoring=faiss needs the optional `faiss` package"):
        pool_ranks(torch.randn(2, 4), torch.randn(5, 4), [[0], [1]], backend="faiss")


class _TableEngine:
    """An engine stand-in: each request's embedding looked up by its image file, else by its caption."""

    def __init__(self, vectors: dict):
        self.vectors, self.stats = vectors, {"encoded": 0}

    def encode(self, requests, desc=""):
        return torch.tensor([self.vectors[r.image or r.text.split(": ")[-1]] for r in requests])


def test_identical_caption_texts_are_one_item_in_the_zero_shot_pools():
    """A caption of another image with the very text of one of an image's own captions has the same
    embedding: it is a positive of that image (not a tie that makes a miss), and in text->image its
    query has both images as positives."""
    from rematch_pl.evaluation.suites import eval_retrieval
    from rematch_pl.zeroshot import RetrievalSet

    rs = RetrievalSet("s", ["a.png", "b.png", "c.png"], ["a cat", "a red cat", "a cat", "a dog"], [0, 0, 1, 2])
    assert rs.positives() == ([[0, 1], [0], [0, 1], [2]], [[0, 1, 2], [0, 2], [3]])
    engine = _TableEngine({"a.png": [1.0, 0.5, 0, 0], "b.png": [1.0, 0, 0, 0.1], "c.png": [0, 0, 1.0, 0],
                           "a cat": [1.0, 0, 0, 0], "a red cat": [0, 1.0, 0, 0], "a dog": [0, 0, 1.0, 0]})
    r = eval_retrieval(engine, rs)
    assert r["i2t"]["R@1"] == 100.0 and r["t2i"]["R@1"] == 100.0  # strict ties between equal texts: 33.3 / 75
    assert r["chance@1"] == {"t2i": pytest.approx(100 * 6 / 4 / 3), "i2t": pytest.approx(100 * 6 / 3 / 4)}


# ---------------------------------------------------------------- cache
def test_cache_roundtrip_chunks_and_other_writers(tmp_path):
    keys = [item_key(s, f"t{i}", "") for i in range(5) for s in ("qry",)]
    assert item_key("qry", "t0", "") != item_key("doc", "t0", "")  # the side is part of the key
    emb = torch.randn(5, 4)
    c = EmbeddingCache(tmp_path, "fp", {"x": 1}, rank=0)
    c.put(keys[:3], emb[:3])
    assert c.flush() is not None and c.flush() is None  # nothing pending the second time
    other = EmbeddingCache(tmp_path, "fp", rank=1)  # another rank / a later run
    assert all(k in other for k in keys[:3]) and keys[3] not in other
    other.put(keys[3:], emb[3:])
    other.flush()
    assert c.scan() == 2
    torch.testing.assert_close(c.get(keys), emb)  # exact: stored as float32
    fresh = EmbeddingCache(tmp_path, "fp")
    assert torch.equal(fresh.get(keys[::-1]), emb.flip(0))
    assert not list(tmp_path.glob("fp/.*tmp"))  # atomic writes leave no temporary file
    mem = EmbeddingCache(None, "memory")
    mem.put(keys[:1], emb[:1])
    assert mem.flush() is None and torch.equal(mem.get(keys[:1]), emb[:1])


def test_image_identity_changes_with_the_file(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"1")
    a = image_identity(str(p), "images/a.png")
    p.write_bytes(b"22")
    assert image_identity(str(p), "images/a.png") != a
    assert image_identity(None) == ""


def test_make_batches_respects_rows_and_token_budget():
    lengths = [100, 90, 50, 40, 10, 10, 10]  # sorted, longest first
    rows = [1, 2, 1, 1, 1, 1, 1]
    b = make_batches(lengths, rows, batch_size=3, max_tokens=None)
    assert b == [[0, 1], [2, 3, 4], [5, 6]]
    b = make_batches(lengths, rows, batch_size=8, max_tokens=200)
    assert all(sum(rows[i] for i in x) * max(lengths[i] for i in x) <= 200 for x in b)
    assert sorted(i for x in b for i in x) == list(range(7))


# ---------------------------------------------------------------- tables
def test_table1_layout_and_meta_tasks():
    assert len(MMEB_SUBSETS) == 36
    counts = {}
    for s in MMEB_SUBSETS:
        task, split = subset_info(s)
        counts[(task, split)] = counts.get((task, split), 0) + 1
    assert sum(v for (t, _), v in counts.items() if t == "CLS") == 10
    assert sum(v for (t, _), v in counts.items() if t == "VQA") == 10
    assert sum(v for (t, _), v in counts.items() if t == "RET") == 12
    assert sum(v for (t, _), v in counts.items() if t == "VG") == 4
    assert sum(v for (_, s), v in counts.items() if s == "IND") == 20
    assert subset_info("imagenet_1k") == ("CLS", "IND")  # names compare ignoring case and punctuation
    row = table1({"Syn_CLS": 0.5, "Syn_VQA": 0.25, "Syn_T2I": 0.2, "Syn_I2T": 0.4, "Syn_VG": 1.0})
    assert row == {"CLS": 50.0, "VQA": 25.0, "RET": 30.0, "VG": 100.0, "IND": 47.0, "OOD": None, "Overall": 47.0,
                   "subsets": 5}
    row = table1({"ImageNet-1K": 0.6, "Place365": 0.2, "Mystery": 0.1})
    assert row["CLS"] == 40.0 and row["IND"] == 60.0 and row["OOD"] == 20.0 and row["Overall"] == pytest.approx(30.0)
    md = markdown([("m", row)], ["CLS", "VQA", "Overall"])
    assert "| m | 40.0 |  | 30.0 |" in md
    t2 = table2({"flickr30k": {"t2i": {"R@1": 12.5}, "i2t": {"R@1": 50.0}}, "sugarcrepe": {"swap": 60.0}})
    assert t2["Flickr30K t->i"] == 12.5 and t2["SugarCrepe Swap"] == 60.0 and t2["COCO t->i"] is None
