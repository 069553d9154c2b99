"""Trial kernels for flash_hopper_ws.py: a causal flash forward and dK/dV over [T, H·D] TMA
descriptors, one loop each (Triton 3.6's Hopper warp specialization rejects a kernel with a
second loop or an early return), masks applied to every block."""
import triton, triton.language as tl

@triton.jit
def _inner(acc, m_i, l_i, q, k_desc, v_desc, row0, col, offs_m, seqlen, lo, hi, full, qk_scale,
           MASKED: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr):
    for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([row0 + n0, col])
        v = v_desc.load([row0 + n0, col])
        s = tl.dot(q, tl.trans(k)) * (qk_scale * 1.4426950408889634)
        if MASKED == 1:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = (offs_n[None, :] < seqlen) & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, -float("inf"))
        elif MASKED == 2:
            if n0 >= full:
                offs_n = n0 + tl.arange(0, BLOCK_N)
                ok = (offs_n[None, :] < seqlen) & (offs_n[None, :] <= offs_m[:, None])
                s = tl.where(ok, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i

@triton.jit
def fwd_ws(Q, K, V, O, LSE, CU, qk_scale, T, Hq, Hk, group, stride_lh,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr, MODE: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    live = m0 < seqlen
    kh = h // group
    q_desc = tl.make_tensor_descriptor(Q, shape=[T, Hq * HEAD_DIM], strides=[Hq * HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[T, Hk * HEAD_DIM], strides=[Hk * HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=[T, Hk * HEAD_DIM], strides=[Hk * HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = q_desc.load([start + m0, h * HEAD_DIM])
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = tl.where(live, tl.minimum(seqlen, m0 + BLOCK_M), 0)
    full = tl.where(live, m0, 0)
    if MODE == 0:
        acc, m_i, l_i = _inner(acc, m_i, l_i, q, k_desc, v_desc, start, kh * HEAD_DIM, offs_m, seqlen, 0, full, full, qk_scale, 0, BLOCK_N, WS)
        acc, m_i, l_i = _inner(acc, m_i, l_i, q, k_desc, v_desc, start, kh * HEAD_DIM, offs_m, seqlen, full, hi, full, qk_scale, 1, BLOCK_N, WS)
    else:
        acc, m_i, l_i = _inner(acc, m_i, l_i, q, k_desc, v_desc, start, kh * HEAD_DIM, offs_m, seqlen, 0, hi, full, qk_scale, MODE, BLOCK_N, WS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    start64 = start.to(tl.int64)
    o_ptrs = O + (start64 + offs_m[:, None]) * (Hq * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < seqlen)[:, None])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + h * stride_lh + start64 + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def dkdv_ws(Q, K, V, DO, DK, DV, LSE, DELTA, CU, qk_scale, T, Hq, Hk, group, stride_lh,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    seq = tl.program_id(1)
    kh = tl.program_id(2)
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    live = n0 < seqlen
    q_desc = tl.make_tensor_descriptor(Q, shape=[T, Hq * HEAD_DIM], strides=[Hq * HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    do_desc = tl.make_tensor_descriptor(DO, shape=[T, Hq * HEAD_DIM], strides=[Hq * HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[T, Hk * HEAD_DIM], strides=[Hk * HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=[T, Hk * HEAD_DIM], strides=[Hk * HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM])
    k = k_desc.load([start + n0, kh * HEAD_DIM])
    v = v_desc.load([start + n0, kh * HEAD_DIM])
    offs_n = n0 + tl.arange(0, BLOCK_N)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = (n0 // BLOCK_M) * BLOCK_M
    nb = tl.where(live, tl.cdiv(seqlen - lo, BLOCK_M), 0)
    start64 = start.to(tl.int64)
    for it in tl.range(0, nb * group, warp_specialize=WS):
        g = it // nb
        m0 = lo + (it - g * nb) * BLOCK_M
        h = kh * group + g
        q = q_desc.load([start + m0, h * HEAD_DIM])
        do = do_desc.load([start + m0, h * HEAD_DIM])
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen
        lse = tl.load(LSE + h * stride_lh + start64 + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + start64 + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(k, tl.trans(q)) * qk_scale
        p = tl.exp2(s * 1.4426950408889634 - lse[None, :] * 1.4426950408889634)
        ok = (offs_m[None, :] < seqlen) & (offs_n[:, None] <= offs_m[None, :])
        p = tl.where(ok, p, 0.0)
        dv += tl.dot(p.to(do.dtype), do)
        dp = tl.dot(v, tl.trans(do))
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (offs_n < seqlen)[:, None]
    dk_ptrs = DK + (start64 + offs_n[:, None]) * (Hk * HEAD_DIM) + kh * HEAD_DIM + offs_d[None, :]
    dv_ptrs = DV + (start64 + offs_n[:, None]) * (Hk * HEAD_DIM) + kh * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptrs, (dk * qk_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
