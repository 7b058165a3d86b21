"""Exact global top-k of a flat score vector, cheap on large N (FORCE.md, "Facts that decide the speed").

Rule: keep exactly k entries, the k largest scores; among entries equal to the k-th largest score,
the highest tie priority wins, then the lowest flat index (flat order = the order of the prunable
parameters, then row-major). The priority is one fixed random float per entry, drawn once from the
seed (`tie_priority`), so equal seeds and inputs give identical masks. Why not the lowest index
alone: at extreme sparsity all scores can be exactly 0 (a layer emptied cuts every gradient), and
the lowest index then keeps only the first layers and empties every later one.
With `priority=None` ties go to the lowest index, what a stable descending sort would give.
Never a sort or `topk` over N: the k-th value is bracketed from a fixed random sample of the scores
and only the bracket (and the entries tied at the k-th value) is resolved. Every pass over N is a
comparison, a `count_nonzero`, or one `nonzero` of a smaller set. Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# A tie priority: the tensor itself, or a function that writes its first `buf.numel()` values into
# the float32 `buf` and returns it (see `tie_priority_`: regenerated on demand instead of stored).
Priority = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

SAMPLE_SIZE = 1 << 16  # sample for the bracket; about 6/sqrt(SAMPLE_SIZE) = 2.3% of N is resolved exactly
_SMALL_N = 1 << 17  # below this, a stable sort of everything is cheaper than being clever
_CHUNK = 1 << 20  # tie scans count per chunk (few launches) and run `nonzero` on one chunk only
_TIE_SEED_OFFSET = 0x51_7E_B4  # the priority's generator is seeded with seed + this (not the sample's stream)


def sample_indices(n: int, device: torch.device | str, seed: int = 0) -> torch.Tensor | None:
    """The fixed random sample used to bracket the k-th score (None when N is small)."""
    if n <= _SMALL_N:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, n, (SAMPLE_SIZE,), generator=gen).to(device)


def tie_priority(n: int, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """The fixed per-entry tie priority: `torch.rand(n)` from a CPU generator seeded with seed + offset."""
    gen = torch.Generator(device="cpu").manual_seed(seed + _TIE_SEED_OFFSET)
    return torch.rand(n, generator=gen).to(device)


def tie_priority_(buf: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Write into the flat float32 `buf` the first `buf.numel()` values of `tie_priority` (the same
    stream, bit for bit: a prefix of `torch.rand` from the same CPU generator); returns `buf`."""
    gen = torch.Generator(device="cpu").manual_seed(seed + _TIE_SEED_OFFSET)
    if buf.device.type == "cpu" and buf.dtype == torch.float32 and buf.is_contiguous():
        return torch.rand(buf.numel(), generator=gen, out=buf)
    return buf.copy_(torch.rand(buf.numel(), generator=gen))


def keep_top_k_(
    scores: torch.Tensor,
    k: int,
    out: torch.Tensor,
    sample: torch.Tensor | None = None,
    priority: Priority | None = None,
    *,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write into the flat bool `out` the k largest of the flat `scores`.

    Ties at the k-th score: highest `priority` first, then lowest index (lowest index alone when
    `priority` is None). `work`: an optional flat float32 buffer of N entries that the tie
    resolution may overwrite (it may be `scores` itself when the caller no longer needs them:
    then `scores` are garbage afterwards); without it a temporary is allocated when needed.
    """
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    if k == n:
        return out.fill_(True)
    if k == 0:
        return out.fill_(False)
    if sample is None or n <= _SMALL_N:
        if priority is None:
            order = torch.sort(scores, descending=True, stable=True).indices[:k]
        else:  # by score, then priority, then index: two stable sorts
            if not isinstance(priority, torch.Tensor):
                priority = priority(torch.empty(n, dtype=torch.float32, device=scores.device))
            by_pri = torch.sort(priority, descending=True, stable=True).indices
            order = by_pri[torch.sort(scores[by_pri], descending=True, stable=True).indices[:k]]
        out.fill_(False)
        return out.index_fill_(0, order, True)

    s = scores[sample]
    m = s.numel()
    below = m * (n - k) / n  # expected number of sampled scores below the k-th largest
    margin = 3.0 * math.sqrt(m) + 8.0  # >= 6 standard deviations of that binomial count
    lo, hi = math.floor(below - margin), math.ceil(below + margin)
    # The (lo+1)-th and (hi+1)-th smallest sampled scores: two selections, cheaper than a sort.
    t_lo = torch.kthvalue(s, lo + 1).values.item() if lo >= 0 else -math.inf
    t_hi = torch.kthvalue(s, hi + 1).values.item() if hi < m else math.inf

    gt = torch.empty_like(out)  # entries above the bracket: all kept
    if t_lo == t_hi:  # the k-th score sits inside a block of equal scores (common: exact zeros)
        torch.gt(scores, t_hi, out=gt)
        n_gt = int(torch.count_nonzero(gt))
        if n_gt <= k and _fill_ties_(scores, t_hi, k - n_gt, gt, priority, sample, work):
            return out.copy_(gt)
        t_lo, t_hi = -math.inf, math.inf  # the sample misled us (astronomically rare): resolve everything

    torch.gt(scores, t_hi, out=gt)
    n_gt = int(torch.count_nonzero(gt))
    if n_gt > k:  # bracket below the k-th score (rare): open it upwards
        t_lo, t_hi = t_hi, math.inf
        gt.fill_(False)
        n_gt = 0
    torch.ge(scores, t_lo, out=out)
    n_ge = int(torch.count_nonzero(out))
    if n_ge < k:  # bracket above the k-th score (rare): open it downwards
        t_lo = -math.inf
        out.fill_(True)
        n_ge = n
    r = k - n_gt  # to take from the bracket [t_lo, t_hi]
    if r == 0:
        return out.copy_(gt)
    if n_ge - n_gt > 8 * n * margin / m + 4096:  # a large block of equal scores at an end of the bracket
        eq_hi = scores == t_hi
        n_ge_hi = n_gt + int(torch.count_nonzero(eq_hi))
        if n_ge_hi >= k:  # the k-th largest score is t_hi
            assert _fill_ties_(scores, t_hi, r, gt, priority, sample, work)
            return out.copy_(gt)
        gt.logical_or_(eq_hi)  # all of t_hi is kept
        n_gt = n_ge_hi
        torch.gt(scores, t_lo, out=out)
        n_gt_lo = int(torch.count_nonzero(out))
        if n_gt_lo < k:  # the k-th largest score is t_lo
            assert _fill_ties_(scores, t_lo, k - n_gt_lo, out, priority, sample, work)
            return out
    out.logical_xor_(gt)  # the bracket: >= t_lo (or > t_lo) and not already kept
    idx = out.nonzero().squeeze(1)
    vals = scores.index_select(0, idx)  # cheaper than advanced indexing on CPU
    r = k - n_gt
    tau = torch.kthvalue(vals, vals.numel() - r + 1).values  # r-th largest in the bracket
    above = vals > tau
    ties = _pick(idx[(vals == tau).nonzero().squeeze(1)], r - int(torch.count_nonzero(above)), priority, work)
    out.copy_(gt)
    out.index_fill_(0, idx[above], True)
    return out.index_fill_(0, ties, True)


def _pick(idx: torch.Tensor, r: int, priority: Priority | None, work: torch.Tensor | None = None) -> torch.Tensor:
    """r of the ascending flat indices `idx` (a small set): the highest priority (then lowest index),
    or the first r."""
    if priority is None or r >= idx.numel():
        return idx[:r]
    if isinstance(priority, torch.Tensor):
        pri = priority[idx]
    else:  # regenerate the stream's prefix up to the last index (into `work` when given)
        m = int(idx[-1]) + 1
        buf = work[:m] if work is not None else torch.empty(m, dtype=torch.float32, device=idx.device)
        pri = priority(buf)[idx]
    sub = torch.empty(idx.numel(), dtype=torch.bool, device=idx.device)
    keep_top_k_(pri, r, sub, sample_indices(idx.numel(), idx.device))  # equal priorities: lowest index
    return idx[sub.nonzero().squeeze(1)]


def _fill_ties_(
    scores: torch.Tensor,
    value: float,
    r: int,
    out: torch.Tensor,
    priority: Priority | None = None,
    sample: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> bool:
    """Set in `out` r entries equal to `value` (highest priority, then lowest index; the first r by
    index when `priority` is None); False when fewer than r exist. `out` holds no entry equal to
    `value`. `scores` are not read after a True return (so `work` may be `scores`)."""
    eq = scores == value
    if priority is not None:
        # Every tied entry competes, and there may be millions (exact zeros): instead of their
        # indices, a float view "priority where tied, -1 elsewhere" over all N, whose r largest
        # (equal priorities: lowest index) the sampled bracket finds, materialising only the bracket.
        m = int(torch.count_nonzero(eq))
        if m < r:
            return False
        if r == m:
            out.logical_or_(eq)
            return True
        if r == 0:
            return True
        w = work if work is not None else torch.empty(scores.numel(), dtype=torch.float32, device=scores.device)
        if isinstance(priority, torch.Tensor):
            w.copy_(priority)
        else:
            priority(w)
        w.masked_fill_(eq.logical_not_(), -1.0)  # priorities are in [0, 1): the r largest are all tied entries
        keep_top_k_(w, r, eq, sample)  # eq's storage reused for the chosen ones
        out.logical_or_(eq)
        return True
    chunks = eq.split(_CHUNK)
    counts = torch.stack([torch.count_nonzero(c) for c in chunks]).cumsum(0)
    if int(counts[-1]) < r:
        return False
    j = int(torch.searchsorted(counts, r))  # first chunk where the running count reaches r
    before = int(counts[j - 1]) if j > 0 else 0
    start = j * _CHUNK
    if start:
        out[:start].logical_or_(eq[:start])
    pos = chunks[j].nonzero().squeeze(1)[: r - before] + start
    out.index_fill_(0, pos, True)
    return True
