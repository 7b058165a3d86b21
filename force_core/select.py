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
comparison, a count, or one `nonzero` of a smaller set; counts and `nonzero` of a flat bool read it
as 8-byte words (`_count`, `_flatnonzero`): several times cheaper on CPU than per-byte scans. Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# A tie priority: the tensor itself, or a function that writes its first `buf.numel()` values into
# the float32 `buf` and returns it (see `tie_priority_`, `TiePriority`: regenerated on demand instead of stored).
Priority = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

SAMPLE_SIZE = 1 << 16  # sample for the bracket; at most 6/sqrt(SAMPLE_SIZE) = 2.3% of N is resolved exactly
_MIN_SAMPLED = 1024  # fewer sampled candidates than this (a selection among few entries): resolve them all
_SMALL_BRACKET = 1 << 15  # a bracket up to this size is resolved by one `kthvalue`, a larger one bracketed again
_LANES = 255  # int64 words summed per group by `_count`: each byte lane stays <= 255, no carry
_SMALL_N = 1 << 17  # below this, a stable sort of everything is cheaper than being clever
_CHUNK = 1 << 20  # tie scans count per chunk (few launches) and run `nonzero` on one chunk only
_TIE_SEED_OFFSET = 0x51_7E_B4  # the priority's generator is seeded with seed + this (not the sample's stream)
_PRIORITY_CHUNK = 1 << 16  # `TiePriority` keeps the generator's state (5 KB) at every this many entries
_PLAN_SLACK = 1e-3  # `TiePriority.keep_for_later`: bracket half-width added for ties that move a little


def sample_indices(n: int, device: torch.device | str, seed: int = 0) -> torch.Tensor | None:
    """The fixed random sample used to bracket the k-th score (None when N is small)."""
    if n <= _SMALL_N:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Sorted: only the multiset of sampled scores matters, and gathers in memory order are cheaper.
    return torch.randint(0, n, (SAMPLE_SIZE,), generator=gen).sort().values.to(device)


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


class TiePriority:
    """`tie_priority` regenerated on demand instead of stored: `priority(buf)` writes its first
    `buf.numel()` values into `buf` (as `tie_priority_`), `priority.at(idx)` gives the values at a few
    indices. The CPU generator's state is kept at every `_PRIORITY_CHUNK`-th entry once the stream has
    passed there, so `at` regenerates only the chunks holding `idx`, not the whole prefix.

    A schedule of selections (`plan`) whose first steps all tie on the same entries (exact zeros) would
    regenerate the whole stream at each of them; `keep_for_later` and `top_among` avoid that (one byte
    per entry kept while such ties are expected)."""

    def __init__(self, seed: int = 0):
        self._gen = torch.Generator(device="cpu").manual_seed(seed + _TIE_SEED_OFFSET)
        self._states = [self._gen.get_state()]  # state at the start of chunk j
        self._k: int | None = None  # the planned selection's k, and the k's expected after it
        self._later: tuple[int, ...] = ()
        self._code: torch.Tensor | None = None  # uint8 per entry: how many kept brackets lie below its priority
        self._blocks: list[tuple[float, float, torch.Tensor, torch.Tensor]] = []  # (lo, hi, indices, priorities)
        self._kept_for: set[int] = set()

    def _fill(self, buf: torch.Tensor, start: int) -> None:
        """The stream's entries start .. start + buf.numel() into the CPU float32 contiguous `buf`; `start` is
        at a chunk start whose state is known. Keeps the states of the chunk starts it passes."""
        n, c = buf.numel(), _PRIORITY_CHUNK
        j, a = start // c, 0
        self._gen.set_state(self._states[j])
        known = (len(self._states) - 1 - j) * c  # entries from `start` whose end-of-chunk states are known
        if known >= n:
            torch.rand(n, generator=self._gen, out=buf)
            return
        if known:
            torch.rand(known, generator=self._gen, out=buf[:known])
            a = known
        while a < n:  # chunk by chunk, keeping each next chunk's starting state
            b = min(a + c, n)
            torch.rand(b - a, generator=self._gen, out=buf[a:b])
            if b - a == c:
                self._states.append(self._gen.get_state())
            a = b

    def __call__(self, buf: torch.Tensor) -> torch.Tensor:
        if buf.device.type == "cpu" and buf.dtype == torch.float32 and buf.is_contiguous():
            self._fill(buf.view(-1), 0)
            return buf
        tmp = torch.empty(buf.numel(), dtype=torch.float32)
        self._fill(tmp, 0)
        return buf.copy_(tmp.view_as(buf))

    def plan(self, k: int, later: Sequence[int] = ()) -> None:
        """The k of the selection about to run, and the k's of the selections expected after it. What
        `keep_for_later` kept is dropped at the first selection it was not kept for."""
        if k not in self._kept_for:
            self._code, self._blocks, self._kept_for = None, [], set()
        self._k, self._later = k, tuple(later)

    @torch.no_grad()
    def keep_for_later(self, w: torch.Tensor, m: int, r: int, tmp: tuple[torch.Tensor, torch.Tensor]) -> None:
        """`w` holds the whole stream, just used to take the r highest priorities among m tied entries at the
        planned k (everything above the tied value, k - r entries, kept). For each later planned k whose tie
        would fall on the same entries (k' - (k - r) of them, fewer than m), keep the entries whose priority
        lies in a bracket around the expected threshold, with their priorities, and for every entry how many
        brackets lie wholly below its priority, so that `top_among` can answer those ties exactly. `tmp`: two
        flat bool buffers of N entries it may overwrite."""
        if self._k is None:
            return
        above, brackets, kept_for = self._k - r, [], set()
        for k2 in self._later:
            r2 = k2 - above
            if 0 < r2 < m:
                q = 1.0 - r2 / m  # expected threshold: priorities are uniform and independent of the ties
                half = 6.0 * math.sqrt(q * (1.0 - q) / m) + _PLAN_SLACK
                brackets.append([q - half, q + half])
                kept_for.add(k2)
        if not brackets:
            return
        brackets.sort()
        merged = [brackets[0]]
        for lo, hi in brackets[1:]:
            if lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        code = torch.zeros(w.numel(), dtype=torch.uint8, device=w.device)
        above_hi, at_least_lo = tmp
        blocks = []
        for lo, hi in merged:
            code.add_(torch.gt(w, hi, out=above_hi).view(torch.uint8))
            idx = _flatnonzero(torch.ge(w, lo, out=at_least_lo).logical_xor_(above_hi))  # lo <= w <= hi
            blocks.append((lo, hi, idx, w.index_select(0, idx)))
        self._code, self._blocks, self._kept_for = code, blocks, kept_for

    @torch.no_grad()
    def top_among(self, eq: torch.Tensor, m: int, r: int, out: torch.Tensor) -> torch.Tensor | None:
        """Into the flat bool `out` the r highest priorities among the m entries set in `eq` (equal
        priorities: lowest index), from what `keep_for_later` kept; None when that cannot tell exactly."""
        q = 1.0 - r / m
        j = next((j for j, (lo, hi, _, _) in enumerate(self._blocks) if lo <= q <= hi), None)
        if j is None:
            return None
        _, _, idx, pri = self._blocks[j]
        n_above = _count(torch.ge(self._code, j + 1, out=out).logical_and_(eq))  # priority above the bracket
        inside = eq.index_select(0, idx).nonzero().squeeze(1)
        if not n_above <= r <= n_above + inside.numel():  # the threshold is not inside the bracket
            return None
        if r > n_above:
            cand, pri = idx.index_select(0, inside), pri.index_select(0, inside)
            sub = torch.empty(cand.numel(), dtype=torch.bool, device=cand.device)
            keep_top_k_(pri, r - n_above, sub, sample_indices(cand.numel(), cand.device))  # equal: lowest index
            out.index_fill_(0, cand.index_select(0, sub.nonzero().squeeze(1)), True)
        return out

    def at(self, idx: torch.Tensor) -> torch.Tensor:
        """The priorities at the ascending flat indices `idx`, regenerating only the chunks holding them."""
        c = _PRIORITY_CHUNK
        i = idx.cpu()
        if i.numel() == 0:
            return torch.empty(0, dtype=torch.float32, device=idx.device)
        chunks, counts = torch.unique_consecutive(i // c, return_counts=True)
        buf = torch.empty(c, dtype=torch.float32)
        while len(self._states) <= int(chunks[-1]):  # walk the stream up to the last chunk, keeping states
            self._fill(buf, (len(self._states) - 1) * c)
        out = torch.empty(i.numel(), dtype=torch.float32)
        pos = 0
        for j, part in zip(chunks.tolist(), i.split(counts.tolist()), strict=True):
            self._fill(buf, j * c)
            out[pos : pos + part.numel()] = buf[part - j * c]
            pos += part.numel()
        return out.to(idx.device)


def keep_top_k_(
    scores: torch.Tensor,
    k: int,
    out: torch.Tensor,
    sample: torch.Tensor | None = None,
    priority: Priority | None = None,
    *,
    work: torch.Tensor | None = None,
    scratch: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Write into the flat bool `out` the k largest of the flat `scores`.

    Ties at the k-th score: highest `priority` first, then lowest index (lowest index alone when
    `priority` is None). `work`: an optional flat float32 buffer of N entries that the tie
    resolution may overwrite (it may be `scores` itself when the caller no longer needs them:
    then `scores` are garbage afterwards); without it a temporary is allocated when needed.
    `scratch`: flat bool buffers of N entries the selection may overwrite, used for its temporaries before
    allocating any (a new N-entry buffer costs its page faults, about one comparison pass over N, on CPU).
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

    return _top_k_(scores, k, out, sample, priority, work, scratch=list(scratch))


def _top_k_(
    scores: torch.Tensor,
    k: int,
    out: torch.Tensor,
    sample: torch.Tensor,
    priority: Priority | None,
    work: torch.Tensor | None,
    among: torch.Tensor | None = None,
    n_among: int = 0,
    scratch: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`keep_top_k_`'s sampled path: into `out` the k largest `scores` among the entries set in the flat bool
    `among` (`n_among` of them; all entries when None), 0 < k < n_among; `out` is False outside `among`.
    Temporaries come from `scratch` while it lasts (see `_bool_like`)."""
    n = scores.numel() if among is None else n_among
    s = scores[sample] if among is None else scores[sample].masked_select(among[sample])
    m = s.numel()
    if m >= _MIN_SAMPLED:
        p = (n - k) / n  # fraction of the candidates below the k-th largest
        below = m * p  # expected number of sampled scores below the k-th largest
        margin = 6.0 * math.sqrt(m * p * (1.0 - p)) + 8.0  # >= 6 standard deviations of that binomial count
        lo, hi = math.floor(below - margin), math.ceil(below + margin)
        # The (lo+1)-th and (hi+1)-th smallest sampled scores: two selections, cheaper than a sort.
        t_lo = torch.kthvalue(s, lo + 1).values.item() if lo >= 0 else -math.inf
        t_hi = torch.kthvalue(s, hi + 1).values.item() if hi < m else math.inf
        large = 8 * n * margin / m + 4096  # far more in the bracket than the sample predicts
    else:  # too few candidates sampled to bracket (few candidates): resolve them all
        t_lo, t_hi, large = -math.inf, math.inf, math.inf

    gt = _bool_like(out, scratch)  # entries above the bracket: all kept
    if t_lo == t_hi:  # the k-th score sits inside a block of equal scores (common: exact zeros)
        n_gt = _count(_among(torch.gt(scores, t_hi, out=gt), among))
        if n_gt <= k and _fill_ties_(scores, t_hi, k - n_gt, gt, priority, sample, work, among, scratch):
            return out.copy_(gt)
        t_lo, t_hi = -math.inf, math.inf  # the sample misled us (astronomically rare): resolve everything

    n_gt = _count(_among(torch.gt(scores, t_hi, out=gt), among))
    if n_gt > k:  # bracket below the k-th score (rare): open it upwards
        t_lo, t_hi = t_hi, math.inf
        gt.fill_(False)
        n_gt = 0
    n_ge = _count(_among(torch.ge(scores, t_lo, out=out), among))
    if n_ge < k:  # bracket above the k-th score (rare): open it downwards
        t_lo = -math.inf
        if among is None:
            out.fill_(True)
        else:
            out.copy_(among)
        n_ge = n
    r = k - n_gt  # to take from the bracket [t_lo, t_hi]
    if r == 0:
        return out.copy_(gt)
    if n_ge - n_gt > large:  # a large block of equal scores at an end of the bracket
        eq_hi = _among(torch.eq(scores, t_hi, out=_bool_like(out, scratch)), among)
        n_ge_hi = n_gt + _count(eq_hi)
        if n_ge_hi >= k:  # the k-th largest score is t_hi
            assert _fill_ties_(scores, t_hi, r, gt, priority, sample, work, among, scratch)
            return out.copy_(gt)
        gt.logical_or_(eq_hi)  # all of t_hi is kept
        n_gt = n_ge_hi
        n_gt_lo = _count(_among(torch.gt(scores, t_lo, out=out), among))
        if n_gt_lo < k:  # the k-th largest score is t_lo
            assert _fill_ties_(scores, t_lo, k - n_gt_lo, out, priority, sample, work, among, scratch)
            return out
    out.logical_xor_(gt)  # the bracket: >= t_lo (or > t_lo) and not already kept
    idx = _flatnonzero(out)
    vals = scores.index_select(0, idx)  # cheaper than advanced indexing on CPU
    r = k - n_gt
    tau = _kth_largest(vals, r, s.masked_select((s >= t_lo) & (s <= t_hi)))  # r-th largest in the bracket
    above = vals > tau
    ties = _pick(idx[(vals == tau).nonzero().squeeze(1)], r - int(torch.count_nonzero(above)), priority, work)
    out.copy_(gt)
    out.index_fill_(0, idx[above], True)
    return out.index_fill_(0, ties, True)


def _kth_largest(vals: torch.Tensor, r: int, sample: torch.Tensor) -> torch.Tensor:
    """The r-th largest of `vals` (1 <= r <= vals.numel()), exactly; `sample`: sampled values from the same
    distribution (the sampled scores that fell in the bracket), to bracket it again and select among few."""
    n, m = vals.numel(), sample.numel()
    if n > _SMALL_BRACKET and m >= _MIN_SAMPLED // 4:
        q = (n - r) / n
        margin = 6.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
        lo, hi = math.floor(m * q - margin), math.ceil(m * q + margin)
        a = torch.kthvalue(sample, lo + 1).values.item() if lo >= 0 else -math.inf
        b = torch.kthvalue(sample, hi + 1).values.item() if hi < m else math.inf
        j = r - int(torch.count_nonzero(vals > b))  # rank from the top among the values in [a, b]
        sub = vals.masked_select((vals >= a) & (vals <= b))
        if 1 <= j <= sub.numel():
            return torch.kthvalue(sub, sub.numel() - j + 1).values
    return torch.kthvalue(vals, n - r + 1).values


def _bool_like(out: torch.Tensor, scratch: list[torch.Tensor] | None) -> torch.Tensor:
    """A flat bool temporary as large as `out`: one of the `scratch` buffers while any are left (each taken
    once per selection), else a new one."""
    return scratch.pop() if scratch else torch.empty_like(out)


def _among(b: torch.Tensor, among: torch.Tensor | None) -> torch.Tensor:
    """The flat bool `b` restricted in place to the entries set in `among` (None: all)."""
    return b if among is None else b.logical_and_(among)


def _words(b: torch.Tensor, group: int = 1) -> int:
    """How many leading entries of the flat bool `b` can be read as int64 words, in whole groups of
    `group` words (0 when `b` is not contiguous or not aligned to 8 bytes)."""
    if not b.is_contiguous() or b.storage_offset() % 8:
        return 0
    return b.numel() - b.numel() % (8 * group)


def _count(b: torch.Tensor) -> int:
    """`count_nonzero` of the flat bool `b`: its bytes are 0 or 1, so summing groups of `_LANES` int64
    words counts each byte lane exactly (no carry) and the lane sums add up the rest."""
    body = _words(b, _LANES)
    if body == 0:
        return int(torch.count_nonzero(b))
    lanes = b[:body].view(torch.int64).view(-1, _LANES).sum(1)
    n = int(lanes.view(torch.uint8).sum(dtype=torch.int64))
    return n + int(torch.count_nonzero(b[body:])) if body < b.numel() else n


def _flatnonzero(b: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the set entries of the flat bool `b`, as `b.nonzero().squeeze(1)`: when few
    are set, finds the int64 words holding any and looks inside those only."""
    body = _words(b)
    words = b[:body].view(torch.int64).nonzero().squeeze(1) if body else None
    if words is None or 16 * words.numel() > body:  # dense: one plain scan is cheaper
        return b.nonzero().squeeze(1)
    q = b[:body].view(torch.int64).index_select(0, words).view(torch.bool).nonzero().squeeze(1)
    idx = words.index_select(0, q >> 3).mul_(8).add_(q & 7)  # byte q of the gathered words
    return torch.cat([idx, b[body:].nonzero().squeeze(1) + body]) if body < b.numel() else idx


def _pick(idx: torch.Tensor, r: int, priority: Priority | None, work: torch.Tensor | None = None) -> torch.Tensor:
    """r of the ascending flat indices `idx` (a small set): the highest priority (then lowest index),
    or the first r."""
    if priority is None or r >= idx.numel():
        return idx[:r]
    if isinstance(priority, torch.Tensor):
        pri = priority[idx]
    elif isinstance(priority, TiePriority):
        pri = priority.at(idx)
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
    sample: torch.Tensor | None = None,  # required with `priority`
    work: torch.Tensor | None = None,
    among: torch.Tensor | None = None,
    scratch: list[torch.Tensor] | None = None,
) -> bool:
    """Set in `out` r entries equal to `value` (highest priority, then lowest index; the first r by
    index when `priority` is None), only entries set in `among` when given; False when fewer than r
    exist. `out` holds no entry equal to `value`. `scores` are not read after a True return (so `work`
    may be `scores`)."""
    eq = _among(torch.eq(scores, value, out=_bool_like(out, scratch)), among)
    if priority is not None:
        # Every tied entry competes, and there may be millions (exact zeros): the r largest priorities
        # among the tied entries (equal priorities: lowest index), found by the sampled bracket over the
        # priorities of all N restricted to `eq`, materialising only the bracket.
        m = _count(eq)
        if m < r:
            return False
        if r == m:
            out.logical_or_(eq)
            return True
        if r == 0:
            return True
        chosen = _bool_like(eq, scratch)
        planned = isinstance(priority, TiePriority)
        if planned and priority.top_among(eq, m, r, chosen) is not None:  # a tie expected here: no regeneration
            out.logical_or_(chosen)
            return True
        w = work if work is not None else torch.empty(scores.numel(), dtype=torch.float32, device=scores.device)
        if isinstance(priority, torch.Tensor):
            w.copy_(priority)
        else:
            priority(w)
        out.logical_or_(_top_k_(w, r, chosen, sample, None, None, among=eq, n_among=m, scratch=scratch))
        if planned:
            priority.keep_for_later(w, m, r, (chosen, eq))  # both free now
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
