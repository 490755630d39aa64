import pytest
import torch

from rematch_pl.fusion import MultiTokenFusion


def test_token_states_gather_last_k_of_each_row():
    f = MultiTokenFusion(3, 4)
    hidden = torch.arange(2 * 7 * 4, dtype=torch.float).view(2, 7, 4)
    lengths = torch.tensor([7, 5])
    st = f.token_states(hidden, lengths, "qry")
    assert torch.equal(st[0], hidden[0, 4:7])
    assert torch.equal(st[1], hidden[1, 2:5])
    assert torch.equal(f.fuse(st), st.mean(1))


def test_sets():
    sep, shared, both = (MultiTokenFusion(4, 8, s) for s in ("separate", "shared", "both"))
    assert not torch.equal(sep.appended("qry"), sep.appended("doc"))
    assert torch.equal(shared.appended("qry"), shared.appended("doc"))
    assert both.appended("qry").shape == (8, 8)
    hidden = torch.randn(1, 10, 8)
    # literal z=[m; Lq; Ld]: the query reads Lq (positions 2..5), the document Ld (6..9)
    assert torch.equal(both.token_states(hidden, torch.tensor([10]), "qry")[0], hidden[0, 2:6])
    assert torch.equal(both.token_states(hidden, torch.tensor([10]), "doc")[0], hidden[0, 6:10])


@pytest.mark.parametrize("k", [-1, 65])
def test_bad_k(k):
    with pytest.raises(ValueError, match="fusion.k"):
        MultiTokenFusion(k, 8)
