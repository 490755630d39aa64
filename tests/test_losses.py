import itertools
import math

import pytest
import torch

from rematch_pl.losses import contrastive_loss, orthogonality_loss


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
