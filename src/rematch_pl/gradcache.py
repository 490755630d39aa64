"""GradCache for ReMatch: big contrastive batches in small chunks, matching loss included.

1. a no-grad pass over every chunk gives the fused embeddings (the RNG state before each
   chunk is saved);
2. the contrastive loss on the detached (and gathered) embeddings gives their gradients;
3. each chunk is re-run with gradients under its replayed RNG state (a frozen vision tower's
   features of step 1 are reused, not recomputed), and
   ``<cached grad, embedding> + chunk share of the orthogonality and matching losses`` is
   backpropagated. The sum over chunks has exactly the gradient of the unchunked loss.

Chunks hold whole instances (query, positive, negatives), so the matching pass of an instance
always sees its own documents. Without explicit hard negatives the matching pass takes another
instance's positive *of the same chunk* as d-.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from .losses import gathered_contrastive_loss


def _rows(side: dict, rows: list[int]) -> dict:
    idx = torch.as_tensor(rows, device=side["ids"].device)
    lengths = side["lengths"][idx]
    L = int(lengths.max())
    out = {"ids": side["ids"][idx, :L], "lengths": lengths, "image": side["image"][idx]}
    if "key" in side:  # document keys (false negatives; d- without hard negatives)
        out["key"] = side["key"][idx]
    return out


def slice_batch(batch: dict, instances: list[int]) -> dict:
    """The sub-batch of `instances` (query, positive, negatives), images re-indexed."""
    B = batch["qry"]["ids"].shape[0]
    neg = batch.get("neg")
    N = neg["ids"].shape[0] // B if neg is not None else 0
    sides = {"qry": _rows(batch["qry"], instances), "pos": _rows(batch["pos"], instances)}
    if N:
        sides["neg"] = _rows(neg, [i * N + n for i in instances for n in range(N)])
    grids = batch["image_grid_thw"]
    patches = grids.prod(-1)  # [n_images]
    starts = torch.cumsum(patches, 0) - patches
    used = sorted({int(i) for s in sides.values() for i in s["image"].tolist() if i >= 0})
    remap = {old: new for new, old in enumerate(used)}
    for s in sides.values():
        s["image"] = torch.tensor([remap.get(int(i), -1) for i in s["image"].tolist()], device=s["image"].device)
    pv = batch["pixel_values"]
    pixel_values = (torch.cat([pv[int(starts[j]): int(starts[j] + patches[j])] for j in used]) if used
                    else pv[:0])
    out = dict(sides, neg=sides.get("neg"), pixel_values=pixel_values, image_grid_thw=grids[used])
    for k in ("subset", "row_id"):
        if k in batch:
            out[k] = [batch[k][i] for i in instances]
    return out


def gradcache_step(
    model,
    batch: dict,
    chunk_size: int,
    backward: Callable[[torch.Tensor], None],
    gather: Callable | None = None,
    rank: int = 0,
    no_sync: Callable[[], object] | None = None,
    new_micro_step: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Accumulate the gradient of the full-batch loss (Eq. 5) chunk by chunk; returns the loss terms.

    `backward(t)` backpropagates a scalar (e.g. LightningModule.manual_backward); `no_sync()`
    is a context manager that defers the gradient all-reduce (DDP) for all chunks but the last;
    `new_micro_step()` runs before every re-forward but the first (DeepSpeed: chunk gradients are
    accumulated, not overwritten).
    """
    B = batch["qry"]["ids"].shape[0]
    chunks = [list(range(s, min(s + chunk_size, B))) for s in range(0, B, chunk_size)]
    subs = [slice_batch(batch, c) for c in chunks]
    pos_first = model.draw_slots(B)  # one draw for the whole batch, as in the unchunked step
    device = next(model.parameters()).device
    cuda = device.type == "cuda"

    # 1. embeddings without gradients, RNG state saved per chunk; a frozen vision tower encodes
    # each chunk's images once, for this pass and the re-forward (the same features either way)
    states, embs = [], []
    reuse = bool(getattr(model, "vision_frozen", False))
    with torch.no_grad():
        for i, sub in enumerate(subs):
            states.append((torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None))
            if reuse:
                subs[i] = sub = dict(sub, image_features=model(sub, mode="images")["image_features"])
            embs.append(model(sub, mode="embed"))
    eq = torch.cat([e["q"] for e in embs]).detach().requires_grad_()
    ep = torch.cat([e["pos"] for e in embs]).detach().requires_grad_()
    has_neg = embs[0]["neg"] is not None
    en = torch.cat([e["neg"] for e in embs]).detach().requires_grad_() if has_neg else None

    # 2. contrastive loss on the cached embeddings -> their gradients (false negatives from the
    # whole batch's document keys, as in the unchunked step)
    fn = model.false_negatives(batch, gather, rank, eq.device)  # [B, M] or None
    loss_cl = gathered_contrastive_loss(eq, ep, en, model.temperature, gather, rank,
                                        fn if model.mask_false_negatives else None)
    grads = torch.autograd.grad(loss_cl, [t for t in (eq, ep, en) if t is not None])
    gq, gp = grads[0], grads[1]
    gn = grads[2] if has_neg else None

    # 3. re-forward each chunk with gradients and backpropagate
    n_rows = sum(e["n_rows"] for e in embs)
    totals: dict[str, torch.Tensor] = {}
    q_off = n_off = 0
    rng_now = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
    for c, (sub, chunk) in enumerate(zip(subs, chunks)):
        b, nn_ = len(chunk), (embs[c]["neg"].shape[0] if has_neg else 0)
        cache = {"q": gq[q_off:q_off + b], "pos": gp[q_off:q_off + b],
                 "neg": gn[n_off:n_off + nn_] if has_neg else None,
                 "orth_weight": embs[c]["n_rows"] / n_rows, "qdm_weight": b / B,
                 "pos_first": pos_first[q_off:q_off + b]}
        torch.set_rng_state(states[c][0])
        if cuda:
            torch.cuda.set_rng_state(states[c][1], device)
        last = c == len(subs) - 1
        if new_micro_step is not None and c > 0:
            new_micro_step()
        ctx = no_sync() if (no_sync is not None and not last) else nullcontext()
        with ctx:
            terms = model(sub, mode="cached", cache=cache)
            backward(terms["surrogate"])
        for k, v in terms.items():
            if k != "surrogate":
                totals[k] = totals.get(k, 0.0) + v.detach() * (cache["qdm_weight"] if k.startswith("acc") else 1.0)
        q_off, n_off = q_off + b, n_off + nn_
    torch.set_rng_state(rng_now[0])
    if cuda:
        torch.cuda.set_rng_state(rng_now[1], device)
    totals["loss_cl"] = loss_cl.detach()
    if fn is not None:
        totals["false_negatives"] = fn.sum(1).float().mean()
    totals["loss"] = (loss_cl.detach() + model.w_orth * totals.get("loss_orth", 0.0)
                      + model.w_qdm * totals.get("loss_qdm", 0.0))
    return totals
