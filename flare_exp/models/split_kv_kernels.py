"""The Triton kernels of the split-KV decode attention (flare_exp/models/split_kv_attention.py says what they
compute and how they are launched). Imported only when a kernel runs: Triton resolves a kernel's helper functions
among this module's names, and importing Triton fixes whether its CPU interpreter runs them (TRITON_INTERPRET)."""
import triton
import triton.language as tl


@triton.jit
def online_block(q, k, v, valid, best, total, acc, scale, PRECISION: tl.constexpr):
    """One block of keys folded into a running softmax: (best, total, acc) of the query rows in q."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    new_best = tl.maximum(best, tl.max(s, axis=1))
    shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing seen yet: no NaN from -inf - -inf
    p = tl.exp(s - shift[:, None])
    kept = tl.exp(best - shift)
    total = total * kept + tl.sum(p, axis=1)
    acc = acc * kept[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return new_best, total, acc


@triton.jit
def finish(best, total, acc):
    """A slice's output and log-sum-exp (-inf and zeros where it saw no key)."""
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, best + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def partial_attention(Q, K, V, M, S, Span, O, L, scale, n_keys, keys_per_split, kv_heads, groups,
                      sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, smb, smn, slots,
                      BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PRECISION: tl.constexpr, SHARED: tl.constexpr):
    row_head = tl.program_id(0)  # b * kv_heads + h
    split = tl.program_id(1)
    b = row_head // kv_heads
    h = row_head % kv_heads
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < groups, other=0.0)
    best = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    if SHARED:  # this row's copy of the common beginning: shared_attention reads it from the source row
        shared_from = tl.load(S + b)
        shared_to = shared_from + tl.load(Span + 1)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    for first in range(start, end, BLOCK_N):
        # no branch on the mask: masked-out rows of a load read no memory, and a loop without a branch is
        # software-pipelined (the next blocks' loads in flight while this one computes)
        n = first + tl.arange(0, BLOCK_N)
        valid = tl.load(M + b * smb + n * smn, mask=n < end, other=0) != 0
        if SHARED:
            valid = valid & ((n < shared_from) | (n >= shared_to))
        k = tl.load(K + b * skb + h * skh + n[:, None] * skn + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + n[:, None] * svn + d[None, :], mask=valid[:, None], other=0.0)
        best, total, acc = online_block(q, k, v, valid, best, total, acc, scale, PRECISION)
    out, lse = finish(best, total, acc)
    rows = row_head * groups + g  # query head h * groups + g of row b, as repeat_kv lays them out
    tl.store(O + (rows[:, None] * slots + split) * HEAD_DIM + d[None, :], out, mask=g[:, None] < groups)
    tl.store(L + rows * slots + split, lse, mask=g < groups)


@triton.jit
def shared_attention(Q, K, V, S, Span, O, L, scale, batch, heads, groups, sqb, sqh, skb, skh, skn, svb, svh,
                     svn, slots, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PRECISION: tl.constexpr):
    """The common beginning's keys, read once from the source row for a block of BLOCK_R rows of one query
    head (a matrix product per key block), into each row's last slot."""
    head = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, HEAD_DIM)
    live = r < batch
    h = head // groups
    q = tl.load(Q + r[:, None] * sqb + head * sqh + d[None, :], mask=live[:, None], other=0.0)
    source = tl.load(Span)
    length = tl.load(Span + 1)
    first_key = tl.load(S + source)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for first in range(0, length, BLOCK_N):
        n = first + tl.arange(0, BLOCK_N)
        valid = n < length
        at = first_key + n
        k = tl.load(K + source * skb + h * skh + at[:, None] * skn + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + source * svb + h * svh + at[:, None] * svn + d[None, :], mask=valid[:, None], other=0.0)
        best, total, acc = online_block(q, k, v, valid, best, total, acc, scale, PRECISION)
    out, lse = finish(best, total, acc)
    rows = r * heads + head
    tl.store(O + (rows[:, None] * slots + slots - 1) * HEAD_DIM + d[None, :], out, mask=live[:, None])
    tl.store(L + rows * slots + slots - 1, lse, mask=live)


@triton.jit
def merge_slices(O, L, Out, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)  # b * heads + query head
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(L + row * SPLITS + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - top)
    parts = tl.load(O + (row * SPLITS + s[:, None]) * HEAD_DIM + d[None, :], mask=s[:, None] < SPLITS, other=0.0)
    norm = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.where(norm > 0, norm, 1.0)
    tl.store(Out + row * HEAD_DIM + d, out.to(Out.dtype.element_ty))
