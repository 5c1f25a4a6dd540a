"""Where the GPU idled in a profiled stretch, and what the host was doing then: the gaps between the GPU's
kernels (and copies), each gap's time given to the innermost ``flare_exp:`` region of the host thread that
launches the work and to the host ops running on that thread during it. A busy share below ~90% says the host
is the bound; this says where."""
from __future__ import annotations

import bisect

REGION = "flare_exp:"  # the prefix of our own profiler regions (``region(name)``)
MIN_GAP_US = 50.0  # shorter gaps are launch latency between kernels, not host work


def region(name: str):
    """A named host region for the profiler's timeline (cheap when no profiler runs)."""
    import torch

    return torch.profiler.record_function(f"{REGION} {name}")


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def idle_gaps(busy: list[tuple[float, float]], window: tuple[float, float] | None = None,
              min_gap_us: float = MIN_GAP_US) -> list[tuple[float, float]]:
    """The stretches of ``window`` (default: the first busy span's start to the last's end) outside the merged
    busy spans that last at least ``min_gap_us``."""
    spans = merged(busy)
    if window is not None:
        spans = [(window[0], window[0]), *spans, (window[1], window[1])]
    return [(a[1], b[0]) for a, b in zip(spans, spans[1:]) if b[0] - a[1] >= min_gap_us]


def gap_table(events, is_gpu, is_annotation, rows: int = 15) -> str:
    """The GPU's idle time while the launching thread ran (the one making the most CUDA runtime calls: from its
    first op to its last), by our host region and by host op (that thread's leaf ops)."""
    from collections import Counter

    kernels = [e for e in events if is_gpu(e) and not is_annotation(e)]
    if not kernels:
        return "(no GPU kernels)"
    host = [e for e in events if not is_gpu(e)]
    launches = Counter(e.thread for e in host if e.name.startswith("cuda")) or Counter(e.thread for e in host)
    thread = launches.most_common(1)[0][0] if launches else None
    mine = [e for e in host if e.thread == thread]
    window = (min(e.time_range.start for e in mine), max(e.time_range.end for e in mine)) if mine else None
    gaps = idle_gaps([(k.time_range.start, k.time_range.end) for k in kernels], window)
    regions = [e for e in mine if e.name.startswith(REGION)]
    leaves = sorted((e for e in mine if not e.cpu_children and not e.name.startswith(REGION)),
                    key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in leaves]
    longest = max((e.time_range.end - e.time_range.start for e in leaves), default=0.0)
    by_region, by_op, covered = Counter(), Counter(), 0.0
    for gap in gaps:
        inner = [r for r in regions if overlap(gap, (r.time_range.start, r.time_range.end)) > 0]
        for name, us in pieces_by_innermost(gap, inner):
            by_region[name] += us
        spans = []  # the leaves overlapping the gap: those starting before its end, back to the longest's reach
        for e in leaves[bisect.bisect_left(starts, gap[0] - longest):bisect.bisect_left(starts, gap[1])]:
            span = (max(gap[0], e.time_range.start), min(gap[1], e.time_range.end))
            if span[1] > span[0]:
                where = innermost(inner, (span[0] + span[1]) / 2)
                by_op[f"{where.removeprefix(REGION).strip()}: {e.name}"] += span[1] - span[0]
                spans.append(span)
        covered += sum(b - a for a, b in merged(spans))
    total = sum(b - a for a, b in gaps)
    lines = [f"{total / 1e3:.1f} ms idle in {len(gaps)} gaps of >= {MIN_GAP_US:.0f} us while the launching thread "
             f"ran (its first op to its last); it ran ops in {covered / 1e3:.1f} ms of them (the rest: Python "
             "between ops, or waits outside torch)", "", f"{'idle ms':>10}  our region (innermost)"]
    lines += [f"{us / 1e3:10.1f}  {name}" for name, us in by_region.most_common(rows)]
    lines += ["", f"{'idle ms':>10}  our region: host op running then (overlapping ops each counted)"]
    lines += [f"{us / 1e3:10.1f}  {name}" for name, us in by_op.most_common(rows)]
    return "\n".join(lines)


def innermost(regions, at: float) -> str:
    """The name of the innermost region (the one that began last) covering the time ``at``."""
    covering = [r for r in regions if r.time_range.start <= at <= r.time_range.end]
    return max(covering, key=lambda r: r.time_range.start).name if covering else OUTSIDE


OUTSIDE = "(outside our regions)"


def pieces_by_innermost(gap: tuple[float, float], regions) -> list[tuple[str, float]]:
    """The gap cut where regions begin and end, each piece given to the innermost region covering it, or to
    "(outside our regions)"."""
    cuts = sorted({gap[0], gap[1], *(t for r in regions for t in (r.time_range.start, r.time_range.end)
                                       if gap[0] < t < gap[1])})
    return [(innermost(regions, (a + b) / 2), b - a) for a, b in zip(cuts, cuts[1:])]
