"""2-process CPU (gloo) checks of the global-batch contrastive loss."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rematch_pl.losses import contrastive_loss, false_negatives, gathered_contrastive_loss


def _worker(rank, world, q, pos, neg, out_dir, keys=None):
    # a file rendezvous: no port to race for
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        from torch.distributed.nn.functional import all_gather

        B = q.shape[0] // world
        sl = slice(rank * B, (rank + 1) * B)
        lq, lp = q[sl].clone().requires_grad_(), pos[sl].clone().requires_grad_()
        ln = neg[sl].clone().requires_grad_() if neg is not None else None
        gather = lambda x: torch.stack(all_gather(x))  # noqa: E731  autograd-aware
        exclude = None
        if keys is not None:  # document keys: false negatives across both ranks' candidates
            pk, nk = keys
            N = nk.shape[0] // pk.shape[0] if nk is not None else 0
            exclude = false_negatives(pk[sl], nk[rank * B * N:(rank + 1) * B * N] if nk is not None else None,
                                      gather=gather, rank=rank)
        loss = gathered_contrastive_loss(lq, lp, ln, 0.05, gather=gather, rank=rank, exclude=exclude)
        loss.backward()
        # DDP averages gradients over ranks: the local rows' gradient is grad / world
        torch.save({"loss": loss.detach(), "gq": lq.grad / world, "gp": lp.grad / world,
                    "gn": ln.grad / world if ln is not None else None}, f"{out_dir}/rank{rank}.tmp")
        os.replace(f"{out_dir}/rank{rank}.tmp", f"{out_dir}/rank{rank}.pt")  # complete or absent
        dist.barrier()  # neither rank tears down while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_neg,masked", [(0, False), (2, False), (2, True)])
def test_two_process_loss_and_grads_equal_single_process(tmp_path, n_neg, masked):
    torch.manual_seed(n_neg)
    world, B, D = 2, 3, 16
    q, pos = torch.randn(world * B, D), torch.randn(world * B, D)
    neg = torch.randn(world * B, n_neg, D) if n_neg else None
    # positives repeated across ranks (keys 1 and 2), a hard negative of rank 1 repeating one
    keys = (torch.tensor([1, 2, 3, 1, 4, 2]), torch.tensor([5, 6, 7, 8, 9, 10, 11, 3, 12, 13, 1, 14])) if masked else None
    try:
        mp.spawn(_worker, args=(world, q, pos, neg, str(tmp_path), keys), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        # gloo may abort a rank while the process group is torn down, after the barrier (seen on
        # loaded CI machines). The checks below only need what both ranks wrote before it.
        if e.signal_name != "SIGABRT" or not all((tmp_path / f"rank{r}.pt").exists() for r in range(world)):
            raise
    sq, sp = q.clone().requires_grad_(), pos.clone().requires_grad_()
    sn = neg.clone().requires_grad_() if neg is not None else None
    ref = contrastive_loss(sq, sp, sn, 0.05, false_negatives(*keys) if masked else None)
    ref.backward()
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # the global loss is the mean of the per-rank losses
    torch.testing.assert_close(sum(r["loss"] for r in res) / world, ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([r["gq"] for r in res]), sq.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["gp"] for r in res]), sp.grad, atol=1e-6, rtol=1e-5)
    if n_neg:
        torch.testing.assert_close(torch.cat([r["gn"] for r in res]), sn.grad, atol=1e-6, rtol=1e-5)


def _bad_rows_worker(rank, world, out_dir):
    from types import SimpleNamespace

    from rematch_pl.data.datamodule import MMEBDataModule

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous_bad", rank=rank, world_size=world)
    try:
        # rank r holds rows i % 2 == r of each subset
        seen = {0: {("A", 0): "missing image", ("A", 2): "missing image", ("B", 4): "empty query"},
                1: {("A", 1): "unreadable image", ("B", 5): "empty query"}}[rank]
        got = MMEBDataModule.all_bad_rows(SimpleNamespace(_bad_seen=seen))
        torch.save(got, f"{out_dir}/bad{rank}.tmp")
        os.replace(f"{out_dir}/bad{rank}.tmp", f"{out_dir}/bad{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_bad_row_counts_sum_all_ranks(tmp_path):
    """summary.json's bad rows are every rank's, not rank 0's alone."""
    try:
        mp.spawn(_bad_rows_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException as e:  # see above: an abort after the barrier
        if e.signal_name != "SIGABRT" or not all((tmp_path / f"bad{r}.pt").exists() for r in range(2)):
            raise
    want = {"A": {"missing image": 2, "unreadable image": 1}, "B": {"empty query": 2}}
    assert [torch.load(tmp_path / f"bad{r}.pt", weights_only=True) for r in range(2)] == [want, want]
