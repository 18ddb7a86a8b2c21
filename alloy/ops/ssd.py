"""Mamba-2 state-space duality (SSD) scan.

Dao & Gu, "Transformers are SSMs" (2024), eq. (SSD) with a scalar decay per head:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t        h_t: (p, n) per head
    y_t = h_t · C_t + D * x_t

Shapes (b batch, l length, h heads, p head dim, g groups of B/C, n state size):
x (b, l, h, p), dt (b, l, h) positive (softplus and bias already applied), A (h,) negative,
B, C (b, l, g, n) with head i reading group i // (h // g), D (h,) or None,
state (b, h, p, n) float32.

`ssd_ref` is the specification (a loop over time); `ssd_chunked` is the `ssd_minimal`
block decomposition (quadratic inside a chunk, linear across chunks); `ssd_step` is one
decode step; `ssd` dispatches on static facts. All recurrence math runs in float32; `y`
comes back in `x.dtype`, states are always float32.

On a CUDA or Metal default device with float inputs, `ssd(impl="auto")` runs the GPU kernels:
`alloy.metal.ssd_step` for T == 1 and `alloy.metal.ssd_chunked` otherwise. Their gradients
are those of `ssd_step` / `ssd_chunked` (custom VJPs), so training may use either path.
"""
import functools
import math

import mlx.core as mx

from alloy import metal
from alloy.metal import ssd_chunked as _chunk_kernels
from alloy.metal import ssd_step as _step_kernel

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_F32 = mx.float32


def _check(x, dt, A, B, C, D, state, decode=False):
    """Validate shapes; raise ValueError naming the offending argument."""
    lead = x.shape[:-2]  # (b, l) or (b,) for a decode step
    nd = 3 if decode else 4
    if x.ndim != nd:
        raise ValueError(f"x must have {nd} dims, got shape {x.shape}")
    h, p = x.shape[-2:]
    if not decode and x.shape[1] == 0:
        raise ValueError("x has length 0")
    if dt.shape != (*lead, h):
        raise ValueError(f"dt must have shape {(*lead, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must have shape {(h,)}, got {A.shape}")
    if B.ndim != nd or B.shape[:-2] != lead:
        raise ValueError(f"B must have shape {(*lead, 'g', 'n')}, got {B.shape}")
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {B.shape}, got {C.shape}")
    g, n = B.shape[-2:]
    if g == 0 or h % g:
        raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must have shape {(h,)}, got {D.shape}")
    if state is not None and state.shape != (x.shape[0], h, p, n):
        raise ValueError(f"state must have shape {(x.shape[0], h, p, n)}, got {state.shape}")


def ssd_ref(x, dt, A, B, C, D=None, initial_state=None):
    """Sequential reference: one step per token, read straight off the recurrence.

    x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,) | None,
    initial_state (b, h, p, n) | None  ->  y (b, l, h, p) in x.dtype, state (b, h, p, n) f32.
    """
    _check(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    n = B.shape[-1]
    r = h // B.shape[2]
    xf, dtf, Af = x.astype(_F32), dt.astype(_F32), A.astype(_F32)
    Bh = mx.repeat(B.astype(_F32), r, axis=2)  # (b, l, h, n): head i reads group i // r
    Ch = mx.repeat(C.astype(_F32), r, axis=2)
    state = mx.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
    ys = []
    for t in range(l):
        # 1. discretize: Ā_t = exp(Δ_t A) (scalar per head), B̄_t x_t = Δ_t x_t ⊗ B_t
        dA = mx.exp(dtf[:, t] * Af)  # (b, h)
        dBx = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        # 2. recurrence: h_t = Ā_t h_{t-1} + B̄_t x_t
        state = dA[..., None, None] * state + dBx
        # 3. readout: y_t = h_t · C_t
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = mx.stack(ys, axis=1)
    # 4. skip connection: y_t += D x_t
    if D is not None:
        y = y + D.astype(_F32)[:, None] * xf
    return y.astype(x.dtype), state


def _segsum(a):
    """Stable segment sums: out[..., i, j] = sum(a[..., j+1 : i+1]) for i >= j, -inf above.

    Built from a masked cumsum (not a difference of cumsums), as in ssd_minimal, so that
    exp(out) is the exact decay from j to i and exactly 0 where j > i.
    """
    T = a.shape[-1]
    a = mx.broadcast_to(a[..., None], (*a.shape, T))  # a[..., i, j] = a_i
    a = mx.where(mx.tril(mx.ones((T, T), mx.bool_), k=-1), a, 0.0)
    s = mx.cumsum(a, axis=-2)
    return mx.where(mx.tril(mx.ones((T, T), mx.bool_), k=0), s, -mx.inf)


def _head_sum(v):
    """(..., h, p) -> (h,): the sum over every axis but the heads' (the D gradient's reduction), as a
    row reduction over p and then a column reduction over the rest. MLX-CUDA's one reduction over
    axes (0, 1, 3) of a (b, l, h, p) array took ~13 ms on an H100 at 16 x 2048 x 24 x 64 (a third of
    a toy Mamba-2 layer's forward + backward; bench/layer_ablation.py, docs/benchmarks.md)."""
    return v.sum(-1).reshape(-1, v.shape[-2]).sum(0)


@mx.custom_function
def _skip(x, D):
    """D x per head in float32 ((b, l, h, p), (h,)): the skip term, with its D gradient reduced by
    `_head_sum` rather than by the broadcast's strided reduction."""
    return D.astype(_F32)[:, None] * x.astype(_F32)


@_skip.vjp
def _skip_vjp(primals, cotangent, output):
    x, D = primals
    dy = cotangent.astype(_F32)
    return (dy * D.astype(_F32)[:, None]).astype(x.dtype), _head_sum(dy * x.astype(_F32)).astype(D.dtype)


def _chunks(v, K, dtype=_F32):
    """(b, l, ...) -> (b, c, K, ...) in dtype with c = ceil(l / K), zero padded at the end."""
    b, l = v.shape[:2]
    pad = -l % K
    v = v.astype(dtype)
    if pad:
        v = mx.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    return v.reshape(b, (l + pad) // K, K, *v.shape[2:])


def _unchunks(v, l):
    """(b, c, K, ...) -> (b, l, ...): `_chunks` undone, the padding dropped."""
    b, c, K = v.shape[:3]
    return v.reshape(b, c * K, *v.shape[3:])[:, :l]


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, chunk_size=64):
    """Chunked SSD (ssd_minimal): diagonal blocks by attention-like quadratic form,
    off-diagonal blocks through chunk states passed along by a segsum over chunks.

    Same arguments and results as `ssd_ref`; any length (T is padded to a multiple of
    `chunk_size` with dt = 0, x = 0: decay 1 and no input, so the final state is exact).
    """
    _check(x, dt, A, B, C, D, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r, K = h // g, chunk_size
    c = -(-l // K)
    dtc = _chunks(dt, K)  # (b, c, K, h)
    X = (_chunks(x, K) * dtc[..., None]).reshape(b, c, K, g, r, p)  # Δ x, heads split by group
    Bc, Cc = _chunks(B, K), _chunks(C, K)  # (b, c, K, g, n)
    a = (dtc * A.astype(_F32)).transpose(0, 3, 1, 2)  # log decay Δ A: (b, h, c, K)
    a_cs = mx.cumsum(a, axis=-1)

    # 1. intra-chunk outputs (diagonal blocks): Y = (L ∘ C Bᵀ) X
    L = mx.exp(_segsum(a)).reshape(b, g, r, c, K, K)  # L[.., l, s] = decay from s to l
    CB = mx.einsum("bclgn,bcsgn->bgcls", Cc, Bc)[:, :, None]  # (b, g, 1, c, K, K)
    Y_diag = mx.einsum("bgrcls,bcsgrp->bclgrp", L * CB, X)

    # 2. state at the end of each chunk from its own inputs (zero initial state);
    #    the decay from s to the chunk end, exp(a_cs[-1] - a_cs[s]), is L's last row
    #    (summed exactly rather than differenced, which loses digits once a_cs is large)
    decay_states = L[..., -1, :]  # (b, g, r, c, K)
    states = mx.einsum("bclgn,bgrcl,bclgrp->bcgrpn", Bc, decay_states, X)
    states = states.reshape(b, c, h, p, n)

    # 3. inter-chunk recurrence: pass states across chunks with a segsum over chunk decays
    h0 = mx.zeros((b, 1, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)[:, None]
    states = mx.concatenate([h0, states], axis=1)  # (b, c+1, h, p, n)
    decay_chunk = mx.exp(_segsum(mx.pad(a_cs[..., -1], [(0, 0), (0, 0), (1, 0)])))  # (b, h, c+1, c+1)
    new_states = mx.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]  # states entering each chunk

    # 4. state -> output (off-diagonal blocks): Y_off = exp(cumsum a) C h_chunk_start
    state_decay_out = mx.exp(a_cs).reshape(b, g, r, c, K)
    states = states.reshape(b, c, g, r, p, n)
    Y_off = mx.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, states, state_decay_out)

    y = (Y_diag + Y_off).reshape(b, c * K, h, p)[:, :l]
    if D is not None:
        y = y + _skip(x, D)
    return y.astype(x.dtype), final_state


def _diag_bwd_ops(CB, a, X, dyc, r):
    """The diagonal blocks' gradient in MLX ops (`ssd_chunked_vjp`'s default; the GPU kernels of
    `alloy.metal.ssd_chunked.ssd_chunked_diag_bwd` compute the same): CB (b, c, g, K, K), a = dt A
    (b, c, K, h), X = dt x and dyc (b, c, K, h, p), float32 -> dX (b, c, K, h, p), dacs (b, c, K, h),
    dCB (b, c, g, K, K)."""
    b, c, g, K, _ = CB.shape
    E = mx.exp(_segsum(a.transpose(0, 1, 3, 2)))                # (b,c,h,K,K): exp(acs_l - acs_s), s <= l
    CBh = mx.repeat(CB, r, axis=2)                              # (b,c,h,K,K)
    Gd = mx.einsum("bclhp,bcshp->bchls", dyc, X)                # dy_l . X_s
    dX = mx.einsum("bchls,bclhp->bcshp", CBh * E, dyc)
    EG = E * Gd
    W = CBh * EG
    dacs = W.sum(-1).transpose(0, 1, 3, 2) - W.sum(-2).transpose(0, 1, 3, 2)
    dCB = EG.reshape(b, c, g, r, K, K).sum(axis=3)
    return dX, dacs, dCB


def ssd_chunked_vjp(x, dt, A, B, C, D, initial_state, dy, dstate, chunk_size=64):
    """The gradient of `ssd_chunked` written out (not autodiff): the same chunk decomposition run
    backwards. Arguments as `ssd_chunked` (D and initial_state arrays), dy (b, l, h, p) and dstate
    (b, h, p, n) the cotangents of y and of the final state. Returns (dx, ddt, dA, dB, dC, dD,
    dinitial_state) in the argument dtypes. (`ssd_chunked_vjp_gpu`: the same for the GPU kernel path.)

    Per chunk (acs = cumsum of dt A inside it, X = dt x, E[l, s] = exp(acs_l - acs_s) for s <= l,
    H_c the state entering chunk c, S_c its own end state, y = (C B^T o E) X + e^acs C H_c + D x):
    the state term's adjoint gives dH_c and dC; the adjoints G_c of the states entering each chunk
    follow the states' recurrence backwards (G_c = dH_c + e^tot_c G_c+1, one (c+1)^2 product as in
    the forward); dS_c = G_c+1 gives dX and dB through the decayed inputs; the diagonal block gives
    dX = (C B^T o E)^T dy, dC, dB through dCB = sum over a group's heads of E o (dy X^T), and the
    decay gradients through (C B^T o E o dy X^T) row and column sums; acs -> dt A by a reverse cumsum.
    """
    _check(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r, K = h // g, chunk_size
    c = -(-l // K)
    Af = A.astype(_F32)
    dtc, xc, dyc = _chunks(dt, K), _chunks(x, K), _chunks(dy, K)  # (b,c,K,h), (b,c,K,h,p) x2
    Bc, Cc = _chunks(B, K), _chunks(C, K)                       # (b,c,K,g,n)
    X = xc * dtc[..., None]
    a = dtc * Af                                                # (b,c,K,h)
    acs = mx.cumsum(a, axis=2)
    wS = mx.exp(acs[:, :, -1:] - acs)                           # (b,c,K,h): decay from s to the chunk end
    grp = lambda v: v.reshape(*v.shape[:3], g, r, *v.shape[4:])  # noqa: E731  (.., h, ..) -> (.., g, r, ..)

    # recompute: chunk end states S_c, states entering each chunk H_c (and the final state)
    Xw = X * wS[..., None]
    S = mx.einsum("bcsgn,bcsgrp->bcgrpn", Bc, grp(Xw)).reshape(b, c, h, p, n)
    h0 = mx.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
    states = mx.concatenate([h0[:, None], S], axis=1)           # (b, c+1, h, p, n)
    tot = acs[:, :, -1].transpose(0, 2, 1)                      # (b, h, c)
    seg_in = mx.pad(tot, [(0, 0), (0, 0), (1, 0)])
    dchunk = mx.exp(_segsum(seg_in))                            # (b, h, c+1, c+1)
    Hall = mx.einsum("bhzc,bchpn->bzhpn", dchunk, states)
    H = Hall[:, :-1]
    eo = mx.exp(acs)

    # the state term y_off = e^acs C H_c
    dys = dyc * eo[..., None]
    dH = mx.einsum("bclgrp,bclgn->bcgrpn", grp(dys), Cc).reshape(b, c, h, p, n)
    dC = mx.einsum("bcgrpn,bclgrp->bclgn", H.reshape(b, c, g, r, p, n), grp(dys))
    yoff = mx.einsum("bclgn,bcgrpn->bclgrp", Cc, H.reshape(b, c, g, r, p, n)).reshape(b, c, K, h, p) * eo[..., None]
    dacs = (dyc * yoff).sum(-1)                                 # (b,c,K,h)

    # adjoint of the state passing: gradients of the passed states, of h0 and of the chunk decays
    dnew = mx.concatenate([dH, (mx.zeros_like(h0) if dstate is None else dstate.astype(_F32))[:, None]], axis=1)
    dstates = mx.einsum("bhzc,bzhpn->bchpn", dchunk, dnew)
    dh0, dS = dstates[:, 0], dstates[:, 1:]
    ddchunk = mx.einsum("bzhpn,bchpn->bhzc", dnew, states)
    _, (dseg,) = mx.vjp(lambda v: (mx.exp(_segsum(v)),), (seg_in,), (ddchunk,))
    dtot = dseg[..., 1:].transpose(0, 2, 1)                     # (b, c, h)

    # chunk end states S_c = sum_s wS_s X_s B_s^T
    dXw = mx.einsum("bcsgn,bcgrpn->bcsgrp", Bc, dS.reshape(b, c, g, r, p, n)).reshape(b, c, K, h, p)
    dB = mx.einsum("bcsgrp,bcgrpn->bcsgn", grp(Xw), dS.reshape(b, c, g, r, p, n))
    dX = dXw * wS[..., None]
    dw = (dXw * Xw).sum(-1)                                     # d wS_s times wS_s
    dtot = dtot + dw.sum(axis=2)
    dacs = dacs - dw

    # diagonal blocks y_diag = (C B^T o E) X
    CB = mx.einsum("bclgn,bcsgn->bcgls", Cc, Bc)                # (b,c,g,K,K)
    dXd, dacsd, dCB = _diag_bwd_ops(CB, a, X, dyc, r)
    dC = dC + mx.einsum("bcgls,bcsgn->bclgn", dCB, Bc)
    dB = dB + mx.einsum("bcgls,bclgn->bcsgn", dCB, Cc)
    dX = dX + dXd

    # acs = cumsum(dt A) inside each chunk (tot, its last entry, gets dtot); X = dt x; y += D x
    da_A, dA = _acs_grads(dacs + dacsd, dtot, dtc, A)
    ddt = da_A + (dX * xc).sum(-1)
    dxc = dX * dtc[..., None] + (dyc * D.astype(_F32)[:, None] if D is not None else 0.0)
    return (_unchunks(dxc, l).astype(x.dtype), _unchunks(ddt, l).astype(dt.dtype), dA.astype(A.dtype),
            _unchunks(dB, l).astype(B.dtype), _unchunks(dC, l).astype(C.dtype),
            None if D is None else _head_sum(dyc * xc).astype(D.dtype),
            None if initial_state is None else dh0.astype(initial_state.dtype))


def _acs_grads(dacs, dtot, dtc, A):
    """acs = cumsum(dt A) inside each chunk, tot its last entry: from the gradients of acs (b, c, K, h)
    and of tot (b, c, h), (da A (b, c, K, h), dA (h,)) with da the gradient of a = dt A."""
    b, c, K, h = dtc.shape
    dacs = dacs + mx.concatenate([mx.zeros((b, c, K - 1, h), _F32), dtot[:, :, None]], axis=2)
    da = mx.cumsum(dacs, axis=2, reverse=True)
    return da * A.astype(_F32), (da * dtc).sum(axis=(0, 1, 2))


def ssd_chunked_vjp_gpu(x, dt, A, B, C, D, initial_state, dy, dstate, chunk_size, starts=None, CB=None,
                        Xw=None):
    """`ssd_chunked_vjp` for the GPU kernel path (same arguments and results, D and initial_state
    arrays; `starts`: the forward kernel's states entering each chunk, (b, c, g, n, r p), reused
    where they have the products' dtype; likewise `CB` (b, c, g, K, K) float32 and `Xw` (b, c, g, K,
    r p), the forward's C B^T and dt x decayed to the chunk end): the states entering each chunk
    recomputed (unless given)
    and their adjoints passed backwards by the forward's state-passing kernel
    (`alloy.metal.ssd_chunked.PASS`, the second time over the chunks in reverse order) instead of
    the (c+1)^2 segsum products; every product a batched matmul in the
    forward's chunk-major layouts ((b, c, g, K, r p) and states (b, c, g, n, r p)); the diagonal
    blocks by `ssd_chunked_diag_bwd`; the elementwise end and the sums over p by one kernel
    (`bwd_finish`). With G~ the adjoint of the state entering chunk c+1 (the reverse pass: G~_c =
    dH_c + e^tot_c G~_c+1 from the final state's cotangent): dS_c = G~_c+1, dtot_c = e^tot_c
    <G~_c+1, H_c>, dh0 = G~_0."""
    from alloy.metal import ssd_chunked as kern

    _check(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r, K = h // g, chunk_size
    c = -(-l // K)

    def gm(v):  # (b, c, K, h, p) -> (b, c, g, K, r p)
        return v.reshape(b, c, K, g, r * p).transpose(0, 1, 3, 2, 4)

    def per_head(v):  # (b, c, g, m, r p) -> sum over m and p -> (b, c, h)
        return v.reshape(b, c, g, v.shape[3], r, p).sum(-1).sum(axis=3).reshape(b, c, h)

    # operand dtype of the batched products (see GRADIENT_PRODUCTS_IN_INPUT_DTYPE)
    op = x.dtype if GRADIENT_PRODUCTS_IN_INPUT_DTYPE and x.dtype in (mx.bfloat16, mx.float16) else _F32
    # x, dy chunked in their own dtype: the float32 products below promote them inside one fused kernel
    dtc, xc, dyc = _chunks(dt, K), _chunks(x, K, x.dtype), _chunks(dy, K, dy.dtype)  # (b,c,K,h), (b,c,K,h,p) x2
    Bg, Cg = _chunks(B, K, op).transpose(0, 1, 3, 2, 4), _chunks(C, K, op).transpose(0, 1, 3, 2, 4)  # (b,c,g,K,n)
    acs = mx.cumsum(dtc * A.astype(_F32), axis=2)               # (b,c,K,h)
    wS = mx.exp(acs[:, :, -1:] - acs)                           # decay from s to the chunk end
    decay = mx.exp(acs[:, :, -1])                               # (b,c,h): e^tot
    # rounded to the product dtype before the layout change, so that the cast rides in the product's
    # fused kernel (after it, MLX-CUDA ran the float32 product and a separate cast copy: ~0.23 ms per
    # layer each for Xw and dys on an H100, docs/benchmarks.md session 8)
    if Xw is None or Xw.dtype != op or Xw.shape != (b, c, g, K, r * p):
        Xw = gm((xc * (dtc * wS)[..., None]).astype(op))        # (b,c,g,K,rp)
    if starts is not None and starts.dtype == op and starts.shape == (b, c, g, n, r * p):
        Hs = starts                                             # states entering the chunks
    else:
        h0 = mx.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
        Hs, _ = kern.state_pass(Bg.swapaxes(-1, -2) @ Xw, decay, h0, op)

    if CB is None or CB.shape != (b, c, g, K, K):
        CB = kern.chunk_products_cb(B, C, Bg, Cg, K)             # (b,c,g,K,K) float32, as in the forward
    acs_t = acs.transpose(0, 1, 3, 2)                           # (b,c,h,K): the diagonal-block kernels' layout
    # dX of the diagonal blocks fused with the end below where `kern.dx_finish_fits`; else, where
    # `kern.dx_dys_fits`, its kernel also writes dys (below) from the dy rows it loads
    fused = kern.dx_finish_fits(x.dtype, op, p, K, n)
    dx_dys = not fused and kern.dx_dys_fits(x.dtype, op, p, K)

    # the state term y_off = e^acs C H_c
    dXd = None
    if dx_dys:
        dXd, dys = kern.bwd_dx_dys(CB, acs_t, dy.astype(x.dtype), g)  # dys (b,c,g,K,rp) in op
    else:
        dys = gm((dyc * mx.exp(acs)[..., None]).astype(op))     # (b,c,g,K,rp)
    dH = Cg.swapaxes(-1, -2) @ dys                              # (b,c,g,n,rp)
    dC = dys @ Hs.swapaxes(-1, -2)                              # (b,c,g,K,n)

    # the adjoints of the passed states, backwards over the chunks
    ds = mx.zeros((b, h, p, n), _F32) if dstate is None else dstate.astype(_F32)
    if p % 32 == 0:  # the pass also sums dS * Hs per chunk and head
        dS, dh0, dots = kern.state_pass(dH, decay, ds, op, reverse=True, dot_with=Hs)  # (b,c,g,n,rp)
    else:
        dS, dh0 = kern.state_pass(dH, decay, ds, op, reverse=True)
        dots = per_head(dS.astype(_F32) * Hs.astype(_F32))
    dtot = decay * dots                                         # (b,c,h)

    # chunk end states S_c = B^T Xw; the diagonal blocks
    dB = Xw @ dS.swapaxes(-1, -2)                               # (b,c,g,K,n)
    dXk, dacsd, dCB = kern.ssd_chunked_diag_bwd(CB, acs_t, x, dt, dy, with_dx=dXd is None and not fused)
    dXd = dXk if dXd is None else dXd
    dCB = dCB.astype(op)
    dC = (dC + dCB @ Bg).transpose(0, 1, 3, 2, 4)               # (b,c,K,g,n)
    dB = (dB + dCB.swapaxes(-1, -2) @ Cg).transpose(0, 1, 3, 2, 4)

    # the elementwise end and the sums over p in one kernel (see BWD_FIN): dx, and per (step, head)
    # the state term's and the end-decay's acs gradients, sum_p dX x, sum_p dy x; fused: with dX of
    # the diagonal blocks and the products C_l H_c, B_l dS_c inside (BWD_DX_FIN_TC, B / C unchunked)
    Dv = mx.zeros((h,), _F32) if D is None else D.astype(_F32)
    if fused:
        dx, ra, rw, rx, rd = kern.bwd_dx_finish(CB, acs, x, dt, dy, B.astype(op), C.astype(op), dS, Hs, Dv)
    else:
        dx, ra, rw, rx, rd = kern.bwd_finish(x, dy, dt, acs, Cg @ Hs, Bg @ dS, dXd, Dv)
    da_A, dA = _acs_grads(ra + dacsd, dtot + rw.sum(axis=2), dtc, A)
    return (dx, _unchunks(da_A + rx, l).astype(dt.dtype), dA.astype(A.dtype), _unchunks(dB, l).astype(B.dtype),
            _unchunks(dC, l).astype(C.dtype), None if D is None else rd.sum(axis=(0, 1, 2)).astype(D.dtype),
            None if initial_state is None else dh0.astype(initial_state.dtype))


def ssd_step(x, dt, A, B, C, D, state):
    """One decode step. x (b, h, p), dt (b, h), A (h,), B/C (b, g, n), D (h,) | None,
    state (b, h, p, n) f32 | None (zeros)  ->  y (b, h, p) in x.dtype, new state f32."""
    _check(x, dt, A, B, C, D, state, decode=True)
    b, h, p = x.shape
    g, n = B.shape[-2:]
    xf, dtf = x.astype(_F32), dt.astype(_F32)
    Bh = mx.repeat(B.astype(_F32), h // g, axis=1)[:, :, None, :]  # (b, h, 1, n)
    Ch = mx.repeat(C.astype(_F32), h // g, axis=1)[:, :, None, :]
    if state is None:
        state = mx.zeros((b, h, p, n), _F32)
    dA = mx.exp(dtf * A.astype(_F32))[..., None, None]
    state = dA * state.astype(_F32) + (dtf[..., None] * xf)[..., None] * Bh
    y = (state * Ch).sum(-1)
    if D is not None:
        y = y + D.astype(_F32)[:, None] * xf
    return y.astype(x.dtype), state


def _balanced_chunk(T, chunk_size):
    """Chunk length for a T-token prefill: as few chunks as `chunk_size` allows, made
    equal and rounded up to a multiple of 8, so padding stays under 8 tokens per chunk."""
    n_chunks = math.ceil(T / chunk_size)
    return min(chunk_size, -(-math.ceil(T / n_chunks) // 8) * 8)


_KERNEL_MAX_CHUNK = 128  # fastest of 64 / 128 / 256 on an H100 at L = 4096 and 16384 (docs/kernels.md)


def _kernel_chunk(T, chunk_size):
    """Chunk length of the kernel path (a multiple of 16, the output kernel's tiling): for long
    inputs min(chunk_size, 128) rounded down to a multiple of 16 (at least 16); for short ones
    the power of two >= T, so short prompts compile at most a few kernel variants. The chunk
    length only changes the order of float operations, never the result's math."""
    k = 16
    while k < T:
        k *= 2
    return min(k, max(16, min(chunk_size, _KERNEL_MAX_CHUNK) // 16 * 16))


_VJP_CHUNK = None  # chunk length of the kernel path's gradient (None: the kernel's)
# The kernel path's gradient: "autodiff" (MLX autodiff of `ssd_chunked`), "explicit"
# (`ssd_chunked_vjp`, the same math written out; equal to autodiff within fp32 rounding) or
# "kernels" (`ssd_chunked_vjp_gpu`: the state passing and the diagonal blocks in GPU kernels).
# bench/ssd_vjp.py on an H100 (session 6), toy shape 16 x 2048 x 24 x 64, N 128, chunk 128: kernel
# forward + explicit gradient 11.75 ms, + autodiff 13.77 ms; the toy train step (bench/train_step.py,
# 16 x 2048) 184.3 ms with "kernels" (docs/benchmarks.md).
GRADIENT = "kernels"
# "kernels" with 16-bit inputs: the gradient's batched matmuls take operands in the input dtype
# (float32 accumulation, results rounded to it), as the forward's state products do, instead of
# float32 operands (TF32 on MLX-CUDA); the state passing still accumulates in float32. H100, session 7,
# toy step (bench/train_step.py, 16 x 2048): 112.8 / 115.6 ms on vs 133.0 / 129.2 ms off (same job);
# the ~8.4 ms of TF32 products left the profile (docs/benchmarks.md).
GRADIENT_PRODUCTS_IN_INPUT_DTYPE = True
# "kernels": the forward kernels also return the states entering each chunk (kept for the backward:
# (b, c, g, n, h/g p) in x's dtype, 100 MB per toy layer at 16 x 2048) and the gradient reuses them
# instead of recomputing them (a batched product and a state pass per layer).
REUSE_FORWARD_STATES = True
# With REUSE_FORWARD_STATES: the forward also returns CB = C B^T (float32, 17 MB per toy layer) and PREP's
# dt x decayed to the chunk end (the gradient's Xw: 100 MB in bf16), which the gradient would compute
# again (two casts and a float32 product for CB; an elementwise pass over x for Xw).
REUSE_FORWARD_PRODUCTS = True
# The chunked path's gradient where no kernel runs (the CPU): "explicit" measured 1.13-1.66x faster
# than autodiff for forward + backward on this project's CPU (bench/ssd_vjp.py, docs/benchmarks.md).
CPU_GRADIENT = "explicit"


@functools.lru_cache(maxsize=None)
def _explicit_chunked(chunk):
    """`ssd_chunked` with the written-out gradient `ssd_chunked_vjp` (D and the state arrays)."""
    return metal.differentiable(
        lambda *a: ssd_chunked(*a, chunk),
        lambda *a: ssd_chunked(*a, chunk),
        lambda x, dt, A, B, C, D, s, dy, ds: ssd_chunked_vjp(x, dt, A, B, C, D, s, dy, ds, chunk),
    )


@functools.lru_cache(maxsize=None)
def _fused_chunked(chunk, gradient: str = "autodiff", reuse_states: bool = False, reuse_products: bool = False):
    vjp_chunk = _VJP_CHUNK or chunk
    if gradient == "kernels" and vjp_chunk == chunk and reuse_states:
        # the forward also returns the states entering each chunk (and with reuse_products CB and Xw, see
        # REUSE_FORWARD_PRODUCTS); the gradient reuses them instead of recomputing them (a product and a
        # state pass per layer)
        n_out = 5 if reuse_products else 3  # y, state, starts[, CB, Xw]

        def kernels_vjp(x, dt, A, B, C, D, s, dy, ds, *rest):
            # rest: the cotangents of starts[, CB, Xw] (n_out - 2), then the outputs y, state, starts[, CB, Xw]
            saved = rest[n_out:]
            return ssd_chunked_vjp_gpu(x, dt, A, B, C, D, s, dy, ds, chunk, *saved)

        return metal.differentiable(
            lambda *a: _chunk_kernels.ssd_chunked(*a, chunk, with_starts=True, with_saved=reuse_products),
            lambda *a: ssd_chunked(*a, chunk),
            kernels_vjp, vjp_outputs=True)
    vjp = ssd_chunked_vjp_gpu if gradient == "kernels" else ssd_chunked_vjp
    explicit = (lambda x, dt, A, B, C, D, s, dy, ds: vjp(x, dt, A, B, C, D, s, dy, ds, vjp_chunk))
    return metal.differentiable(
        lambda *a: _chunk_kernels.ssd_chunked(*a, chunk),
        lambda *a: ssd_chunked(*a, vjp_chunk),
        None if gradient == "autodiff" else explicit,
    )


_fused_step = metal.differentiable(_step_kernel.ssd_step, lambda *a: ssd_step(*a))


def kernel_applies(x) -> bool:
    """Static facts under which `impl="auto"` takes the GPU kernels."""
    return metal.backend() is not None and x.dtype in _FLOATS


def _ssd_kernel(x, dt, A, B, C, D, initial_state, chunk_size):
    if metal.backend() is None:
        raise ValueError("ssd: impl='kernel' needs a CUDA or Metal default device")
    b, T, h, p = x.shape
    D = mx.zeros((h,), mx.float32) if D is None else D
    if initial_state is None:
        initial_state = mx.zeros((b, h, p, B.shape[-1]), mx.float32)
    if T == 1:
        y, state = _fused_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, initial_state)
        return y[:, None], state
    if GRADIENT not in ("autodiff", "explicit", "kernels"):
        raise ValueError(f"alloy.ops.ssd.GRADIENT must be 'autodiff', 'explicit' or 'kernels', got {GRADIENT!r}")
    y, state = _fused_chunked(_kernel_chunk(T, chunk_size), GRADIENT, REUSE_FORWARD_STATES,
                              REUSE_FORWARD_PRODUCTS)(x, dt, A, B, C, D, initial_state)[:2]
    return y, state


def ssd(x, dt, A, B, C, D=None, initial_state=None, chunk_size=256, impl="auto"):
    """Mamba-2 SSD scan. Arguments as `ssd_ref`; returns (y (b, l, h, p), state (b, h, p, n) f32).

    impl: "ref" (sequential), "chunked", "kernel" (GPU kernels: one fused decode step for
    T == 1, else the chunked kernel path with chunks of `_kernel_chunk(T, chunk_size)`), or
    "auto" (the kernels where `kernel_applies`; otherwise T == 1 -> one decode step, else
    chunked with a balanced chunk length <= chunk_size). The chunked kernels take dt >= 0 and A <= 0
    (a Mamba-2 layer's softplus dt and -exp(A_log)): the decays exp(dt A) lie in [0, 1], which the
    output and dX kernels rely on when they split exp(acs_l - acs_s) into two factors
    (`alloy.metal.ssd_chunked.OUT_FACTORED`).
    """
    if impl not in ("auto", "ref", "chunked", "kernel"):
        raise ValueError(f"unknown ssd impl {impl!r}; expected 'auto', 'ref', 'chunked' or 'kernel'")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if impl == "ref":
        return ssd_ref(x, dt, A, B, C, D, initial_state)
    if impl == "chunked":
        return ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size)
    _check(x, dt, A, B, C, D, initial_state)
    if impl == "kernel" or kernel_applies(x):
        return _ssd_kernel(x, dt, A, B, C, D, initial_state, chunk_size)
    T = x.shape[1]
    if T == 1:
        y, state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, initial_state)
        return y[:, None], state
    K = _balanced_chunk(T, chunk_size)
    if CPU_GRADIENT == "explicit":
        b, _, h, p = x.shape
        Dz = mx.zeros((h,), mx.float32) if D is None else D  # D = 0, h0 = 0: the same y and state
        s0 = mx.zeros((b, h, p, B.shape[-1]), mx.float32) if initial_state is None else initial_state
        return _explicit_chunked(K)(x, dt, A, B, C, Dz, s0)
    return ssd_chunked(x, dt, A, B, C, D, initial_state, K)


# ---------------------------------------------------------------------------------------------
# The Mamba-2 mixer between its projections for one decode token (conv step + dt + SSD step +
# gate), fused into one GPU launch by `alloy.metal.mamba2_step`. Batch-1 decode is launch-bound;
# this replaces ~60 small ops per layer with one.


def mamba2_step_ref(zxbcdt, conv_w, conv_b, conv_state, dt_bias, A_log, D, dt_lim, ssm_state):
    """zxbcdt (b, 2*DI + 2*G*N + H) — one token's in_proj output; conv_w (CD, K) or (CD, 1, K); conv_b (CD,) | None;
    conv_state (b, K-1, CD); dt_bias, A_log, D (H,); dt_lim (lo, hi) floats; ssm_state (b, H, P, N)
    f32  ->  (y * silu(z) (b, DI) in zxbcdt.dtype, new conv state, new ssm state f32).

    The same math as the Mamba-2 layer's T = 1 path (causal_conv1d_ref, softplus, clip, ssd_step)
    with the gate applied before the norm (the layer normalises afterwards)."""
    from alloy.ops.conv import causal_conv1d_ref

    b, _ = zxbcdt.shape
    _, H, P, N = ssm_state.shape
    CD = conv_w.shape[0]
    DI = H * P
    G = (CD - DI) // (2 * N)
    z, xBC, dt = mx.split(zxbcdt, [DI, DI + CD], axis=-1)
    xBC, new_conv = causal_conv1d_ref(xBC[:, None], conv_w, conv_b, conv_state, activation="silu")
    xs, Bm, Cm = mx.split(xBC[:, 0], [DI, DI + G * N], axis=-1)
    dtf = mx.logaddexp(dt.astype(_F32) + dt_bias.astype(_F32), 0.0)
    dtf = mx.clip(dtf, dt_lim[0], dt_lim[1])
    A = -mx.exp(A_log.astype(_F32))
    y, new_ssm = ssd_step(xs.reshape(b, H, P), dtf, A, Bm.reshape(b, G, N), Cm.reshape(b, G, N), D,
                          ssm_state)
    zf = z.astype(_F32)
    out = (y.reshape(b, DI).astype(_F32) * (zf * mx.sigmoid(zf))).astype(zxbcdt.dtype)
    return out, new_conv.astype(conv_state.dtype), new_ssm


def mamba2_step_kernel_applies(zxbcdt, conv_w) -> bool:
    return metal.backend() is not None and zxbcdt.dtype in _FLOATS and conv_w.shape[-1] >= 2


def mamba2_step(zxbcdt, conv_w, conv_b, conv_state, dt_bias, A_log, D, dt_lim, ssm_state,
                impl="auto"):
    """Public fused decode step (arguments as `mamba2_step_ref`). impl: "auto" (the kernel where
    `mamba2_step_kernel_applies`, else the reference), "ref" or "kernel"."""
    if impl not in ("auto", "ref", "kernel"):
        raise ValueError(f"mamba2_step: impl must be 'auto', 'ref' or 'kernel', got {impl!r}")
    if zxbcdt.ndim != 2:
        raise ValueError(f"mamba2_step: zxbcdt must be (b, d_in_proj), got shape {zxbcdt.shape}")
    b, dp = zxbcdt.shape
    _, H, P, N = ssm_state.shape
    conv_w = conv_w.reshape(conv_w.shape[0], conv_w.shape[-1])  # (CD, K) or HF's (CD, 1, K)
    CD, K = conv_w.shape
    if dp != H * P + CD + H:
        raise ValueError(f"mamba2_step: zxbcdt width {dp} != DI + conv_dim + heads = {H * P + CD + H}")
    if conv_state.shape != (b, K - 1, CD):
        raise ValueError(f"mamba2_step: conv_state must be {(b, K - 1, CD)}, got {conv_state.shape}")
    if impl == "ref" or (impl == "auto" and not mamba2_step_kernel_applies(zxbcdt, conv_w)):
        return mamba2_step_ref(zxbcdt, conv_w, conv_b, conv_state, dt_bias, A_log, D, dt_lim, ssm_state)
    if metal.backend() is None:
        raise ValueError("mamba2_step: impl='kernel' needs a CUDA or Metal default device")
    from alloy.metal.mamba2_step import mamba2_step as kernel

    lim = mx.array([float(dt_lim[0]), float(dt_lim[1])], dtype=_F32)
    return kernel(zxbcdt, conv_w, conv_b, conv_state, dt_bias, A_log, D, lim, ssm_state)
