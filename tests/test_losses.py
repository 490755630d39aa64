import itertools
import math

import pytest
import torch

from rematch_pl.losses import contrastive_loss, false_negatives, orthogonality_loss


def orth_reference(tokens):
    """Eq. 2 by an explicit float64 loop, mean over samples."""
    tokens = tokens.double()
    total = 0.0
    for e in tokens:
        K = e.shape[0]
        en = [v / v.norm() for v in e]
        s = sum(float(en[i] @ en[j]) ** 2 for i, j in itertools.combinations(range(K), 2))
        total += 2.0 / (K * (K - 1)) * s
    return total / tokens.shape[0]


@pytest.mark.parametrize("K", [2, 4, 16])
def test_orthogonality_matches_eq2_loop(K):
    t = torch.randn(5, K, 32)
    assert orthogonality_loss(t).item() == pytest.approx(orth_reference(t), rel=1e-5)


def test_orthogonality_extremes():
    eye = torch.eye(8).unsqueeze(0).repeat(3, 1, 1) * 3.0  # orthogonal, not unit norm
    assert orthogonality_loss(eye).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.randn(1, 1, 16).repeat(4, 6, 1)
    assert orthogonality_loss(same).item() == pytest.approx(1.0, abs=1e-6)
    assert orthogonality_loss(torch.randn(2, 1, 8)).item() == 0.0


def contrastive_reference(q, pos, neg, tau):
    """Eq. 3 written out in float64: positive, own negatives and all other batch documents."""
    q, pos = q.double(), pos.double()
    docs = [pos[j] for j in range(len(pos))]
    if neg is not None:
        docs += [neg[j, n].double() for j in range(neg.shape[0]) for n in range(neg.shape[1])]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    total = 0.0
    for i in range(len(q)):
        num = math.exp(cos(q[i], pos[i]) / tau)
        den = sum(math.exp(cos(q[i], d) / tau) for d in docs)
        total += -math.log(num / den)
    return total / len(q)


@pytest.mark.parametrize("n_neg", [0, 1, 3])
def test_contrastive_matches_reference(n_neg):
    torch.manual_seed(n_neg)
    q, pos = torch.randn(6, 16), torch.randn(6, 16)
    neg = torch.randn(6, n_neg, 16) if n_neg else None
    got = contrastive_loss(q, pos, neg, temperature=0.5).item()
    assert got == pytest.approx(contrastive_reference(q, pos, neg, 0.5), rel=1e-5)


def test_contrastive_hard_negative_matters():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = q.clone()
    easy = -pos.unsqueeze(1)
    hard = (pos + 0.1 * torch.randn(2, 2)).unsqueeze(1)
    assert contrastive_loss(q, pos, hard, 0.1) > contrastive_loss(q, pos, easy, 0.1)


def test_false_negatives_mark_repeats_of_each_positive_but_not_the_positive():
    pos_key = torch.tensor([7, 8, 7])  # queries 0 and 2 share their positive (a class label)
    neg_key = torch.tensor([9, 7, 8])  # query 1's hard negative repeats the positive of 0 and 2
    fn = false_negatives(pos_key, neg_key)  # [3, 6]: columns pos 0..2, neg 0..2
    assert fn.tolist() == [[False, False, True, False, True, False],
                           [False, False, False, False, False, True],
                           [True, False, False, False, True, False]]
    assert not false_negatives(torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])).any()


def contrastive_reference_without(q, pos, neg, tau, pos_key, neg_key):
    """Eq. 3 in float64 with each query's candidates that repeat its positive (equal key, other
    column) dropped from its denominator."""
    q, pos = q.double(), pos.double()
    docs = [(pos[j], int(pos_key[j]), j) for j in range(len(pos))]
    if neg is not None:
        docs += [(neg[j, n].double(), int(neg_key[j * neg.shape[1] + n]), len(pos) + j * neg.shape[1] + n)
                 for j in range(neg.shape[0]) for n in range(neg.shape[1])]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    total = 0.0
    for i in range(len(q)):
        kept = [d for d, k, col in docs if col == i or k != int(pos_key[i])]
        num = math.exp(cos(q[i], pos[i]) / tau)
        total += -math.log(num / sum(math.exp(cos(q[i], d) / tau) for d in kept))
    return total / len(q)


@pytest.mark.parametrize("n_neg", [0, 2])
def test_excluded_false_negatives_equal_dropping_them(n_neg):
    torch.manual_seed(3)
    B, D = 6, 16
    q, pos = torch.randn(B, D), torch.randn(B, D)
    pos_key = torch.tensor([1, 2, 1, 3, 1, 2])
    neg = torch.randn(B, n_neg, D) if n_neg else None
    neg_key = torch.tensor([4, 2, 5, 1, 6, 7, 3, 8, 9, 10, 2, 11])[: B * n_neg] if n_neg else None
    exclude = false_negatives(pos_key, neg_key)
    assert exclude.any()
    got = contrastive_loss(q, pos, neg, 0.5, exclude).item()
    assert got == pytest.approx(contrastive_reference_without(q, pos, neg, 0.5, pos_key, neg_key), rel=1e-5)
    assert got < contrastive_loss(q, pos, neg, 0.5).item()  # fewer candidates against each positive
