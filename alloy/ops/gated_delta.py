"""Gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks").

Per head, with a (K, V) state S, unit-norm keys and a query scale of K^-1/2:

    S_t = exp(g_t) S_{t-1}                                  1. gated decay (g_t <= 0)
    u_t = beta_t (v_t - S_t^T k_t)                          2. delta: correct what S predicts for k_t
    S_t = S_t + k_t u_t^T                                   3. rank-one write
    o_t = S_t^T q_t                                          4. read

Shapes: q, k (B, T, Hk, K); v (B, T, H, V) with Hk | H (each q/k head serves H/Hk consecutive
value heads); beta (B, T, H); g (B, T, H) — one decay per head (Gated DeltaNet) — or (B, T, H, K) —
one decay per key channel (Kimi Delta Attention: S_t = diag(exp(g_t)) S_{t-1}); state (B, H, K, V)
float32. ``l2norm`` normalises q and k
(eps 1e-6, the FLA convention) before the rule; q is then scaled by K^-1/2.

The chunked form (WY / UT transform) processes C tokens at a time: inside a chunk the writes
form a unit-lower-triangular system (I + L) solved by log2(C) products (I + N)(I + N^2)(I + N^4)...;
across chunks the state follows an affine map S' = M S + N composed by a log-depth associative scan,
so no Python loop runs over time or chunks.
"""
from __future__ import annotations

import functools
import math

import mlx.core as mx


def _check(q, k, v, g, beta):
    """Shape checks of the public ops (ValueError naming the argument)."""
    B, T, Hk, K = q.shape
    H = v.shape[2]
    if k.shape != q.shape:
        raise ValueError(f"gated_delta: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.shape[:2] != (B, T) or H % Hk:
        raise ValueError(f"gated_delta: v shape {tuple(v.shape)} needs (B, T) = {(B, T)} and heads divisible by {Hk}")
    if beta.shape != (B, T, H):
        raise ValueError(f"gated_delta: beta shape {tuple(beta.shape)}, expected {(B, T, H)}")
    if g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"gated_delta: g shape {tuple(g.shape)}, expected {(B, T, H)} or {(B, T, H, K)}")


def _prepare(q, k, v, g, beta, l2norm: bool):
    _check(q, k, v, g, beta)
    Hk, K, H = q.shape[2], q.shape[3], v.shape[2]
    f32 = mx.float32
    q, k, v, g, beta = (a.astype(f32) for a in (q, k, v, g, beta))
    if l2norm:
        q = q * mx.rsqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k * mx.rsqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    if H != Hk:
        q = mx.repeat(q, H // Hk, axis=2)
        k = mx.repeat(k, H // Hk, axis=2)
    return q * (K ** -0.5), k, v, g, beta


def gated_delta_ref(q, k, v, g, beta, initial_state=None, l2norm: bool = True):
    """Sequential reference. Returns (o (B, T, H, V) in v.dtype, final state (B, H, K, V) fp32)."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, l2norm)
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = mx.zeros((B, H, K, V), mx.float32) if initial_state is None else initial_state.astype(mx.float32)
    outs = []
    per_channel = g.ndim == 4
    for t in range(T):
        decay = mx.exp(g[:, t])
        S = S * (decay[..., :, None] if per_channel else decay[..., None, None])  # 1.
        pred = (S * k[:, t, :, :, None]).sum(-2)                               # S^T k   (B, H, V)
        u = beta[:, t, :, None] * (v[:, t] - pred)                              # 2.
        S = S + k[:, t, :, :, None] * u[:, :, None, :]                          # 3.
        outs.append((S * q[:, t, :, :, None]).sum(-2))                          # 4.
    return mx.stack(outs, axis=1).astype(dtype), S


def gated_delta_step(q, k, v, g, beta, state, l2norm: bool = True):
    """One token: q, k (B, Hk, K); v (B, H, V); g, beta (B, H) -> (o (B, H, V), new state)."""
    o, S = gated_delta_ref(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], state, l2norm)
    return o[:, 0], S


def _unit_lower_inverse(Lm):
    """(I + Lm)^-1 for strictly lower-triangular Lm (..., C, C): prod_j (I + N^(2^j)), N = -Lm."""
    C = Lm.shape[-1]
    eye = mx.eye(C, dtype=Lm.dtype)
    N = -Lm
    inv = eye + N
    P = N
    for _ in range(max(0, math.ceil(math.log2(C)) - 1)):
        P = P @ P
        inv = inv @ (eye + P)
    return inv


def _chunk_local(q, k, v, g, beta, l2norm: bool, C: int):
    """Everything of the chunked form that is local to a chunk (batched over all chunks at once):
    q_dec, k_dec, w, u (B, H, n, C, K|V), the intra-chunk causal scores attn (B, H, n, C, C) and the
    log decay to each chunk's end, last (B, H, n, 1) or (B, H, n, 1, K) for per-channel decays."""
    q, k, v, g, beta = _prepare(q, k, v, g, beta, l2norm)
    B, T, H, K = q.shape
    pad = (-T) % C
    if pad:  # padded tokens: no decay (g = 0) and no write (beta = 0), so the final state is exact
        zpad = lambda a: mx.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
        q, k, v, g, beta = (zpad(a) for a in (q, k, v, g, beta))
    n = (T + pad) // C
    per_channel = g.ndim == 4
    # (B, H, n, C, ...) layout
    r = lambda a: a.reshape(B, n, C, H, *a.shape[3:]).transpose(0, 3, 1, 2, *range(4, a.ndim + 1))  # noqa: E731
    q, k, v = r(q), r(k), r(v)
    g, beta = r(g), r(beta)
    cum = mx.cumsum(g, axis=3)                         # log decay from chunk start: (B,H,n,C) or (B,H,n,C,K)
    causal = mx.tril(mx.ones((C, C), dtype=mx.bool_))
    strict = mx.tril(mx.ones((C, C), dtype=mx.bool_), -1)
    kb = k * beta[..., None]
    if per_channel:  # decays exp(cum_i - cum_j) per key channel: (B,H,n,C,C,K)
        diff = cum[..., :, None, :] - cum[..., None, :, :]
        dk = mx.where(causal[..., None], mx.exp(mx.where(causal[..., None], diff, 0.0)), 0.0)
        Lm = mx.where(strict, mx.einsum("bhnik,bhnjk,bhnijk->bhnij", kb, k, dk), 0.0)
        attn = mx.where(causal, mx.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, dk), 0.0)
        ecum = mx.exp(cum)
        last = cum[..., -1:, :]                        # (B,H,n,1,K)
        k_dec = k * mx.exp(last - cum)
    else:
        diff = cum[..., :, None] - cum[..., None, :]
        decay = mx.where(causal, mx.exp(mx.where(causal, diff, 0.0)), 0.0)   # exp(cum_i - cum_j), j <= i
        # intra-chunk UT system: (I + L) W = beta * [v | k exp(cum)],  L = strict_lower(beta k k^T * decay)
        Lm = mx.where(strict, (kb @ k.swapaxes(-1, -2)) * decay, 0.0)
        attn = mx.where(causal, (q @ k.swapaxes(-1, -2)) * decay, 0.0)   # intra-chunk q.k with decay
        ecum = mx.exp(cum)[..., None]
        last = cum[..., -1:]                           # (B,H,n,1)
        k_dec = k * mx.exp(last - cum)[..., None]      # keys decayed to the chunk end
    inv = _unit_lower_inverse(Lm)
    u = inv @ (v * beta[..., None])                    # new values, (B,H,n,C,V)
    w = inv @ (kb * ecum)                              # decayed keys reading S, (B,H,n,C,K)
    return q * ecum, k_dec, w, u, attn, last


@functools.lru_cache(maxsize=None)
def _compiled_pass_path(l2norm: bool, C: int):
    """The kernel path's MLX parts, compiled (their elementwise work fuses): the chunk-local prep,
    and the epilogue o = o_inter + attn v_new back in (B, T, H, V) order."""
    def prep(q, k, v, g, beta):
        q_dec, k_dec, w, u, attn, last = _chunk_local(q, k, v, g, beta, l2norm, C)
        decay_last = mx.exp(last[..., 0, :] if g.ndim == 4 else last[..., 0])
        return w, u, k_dec, q_dec, decay_last, attn

    def finish(o_inter, attn, v_new, T: int):
        B, H, n, _, V = o_inter.shape
        o = o_inter + attn @ v_new
        return o.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return mx.compile(prep), finish


def gated_delta_chunked(q, k, v, g, beta, initial_state=None, l2norm: bool = True, chunk_size: int = 64,
                        pass_kernel: bool = False):
    """Chunked (WY/UT) gated delta rule; same contract as ``gated_delta_ref``. ``pass_kernel``: the
    sweep across chunks runs in the GPU kernel `alloy.metal.gated_delta_chunked` (state in registers)
    instead of the log-depth affine scan of (K, K) maps, with the chunk-local work compiled."""
    if chunk_size < 1:
        raise ValueError(f"gated_delta_chunked: chunk_size must be >= 1, got {chunk_size}")
    dtype = v.dtype
    _check(q, k, v, g, beta)
    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[3]
    C = chunk_size
    S0 = mx.zeros((B, H, K, V), mx.float32) if initial_state is None else initial_state.astype(mx.float32)
    if pass_kernel:  # the sequential sweep in one kernel; the intra-chunk term stays a batched matmul
        from alloy.metal.gated_delta_chunked import chunk_pass
        prep, finish = _compiled_pass_path(bool(l2norm), C)
        w, u, k_dec, q_dec, decay_last, attn = prep(q, k, v, g, beta)
        v_new, o_inter, S_final = chunk_pass(w, u, k_dec, q_dec, decay_last, S0)
        return finish(o_inter, attn, v_new, T).astype(dtype), S_final
    q_dec, k_dec, w, u, attn, last = _chunk_local(q, k, v, g, beta, l2norm, C)
    n = q_dec.shape[2]
    if g.ndim == 4:
        M_decay = mx.exp(last[..., 0, :])[..., :, None] * mx.eye(K, dtype=mx.float32)
    else:
        M_decay = mx.exp(last)[..., None] * mx.eye(K, dtype=mx.float32)
    # state map per chunk: S' = diag(exp(last)) S + k_dec^T (u - w S) = M S + Nc
    eyeK = mx.eye(K, dtype=mx.float32)
    M = M_decay - k_dec.swapaxes(-1, -2) @ w           # (B,H,n,K,K)
    Nc = k_dec.swapaxes(-1, -2) @ u                    # (B,H,n,K,V)
    # inclusive scan of affine maps (M, N) over chunks, log depth: (M2, N2) o (M1, N1) = (M2 M1, M2 N1 + N2)
    s = 1
    while s < n:
        Mp = mx.concatenate([mx.broadcast_to(eyeK, (B, H, s, K, K)), M[:, :, :-s]], axis=2)
        Np = mx.concatenate([mx.zeros((B, H, s, K, V)), Nc[:, :, :-s]], axis=2)
        Nc = M @ Np + Nc
        M = M @ Mp
        s *= 2
    after = M @ S0[:, :, None] + Nc                    # state after each chunk
    before = mx.concatenate([S0[:, :, None], after[:, :, :-1]], axis=2)  # state entering each chunk
    o = q_dec @ before + attn @ (u - w @ before)       # (B,H,n,C,V)
    o = o.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]
    return o.astype(dtype), after[:, :, -1]


_RECURRENT_MAX_T = 64  # the recurrent kernel up to this many tokens; the chunked form beyond


_PASS_CHUNK = 64  # chunk length of the kernel path's chunked form


@functools.lru_cache(maxsize=None)
def _kernel_path(form: str, l2norm: bool):
    """The GPU kernels of one form, with their gradient: "recurrent" (VJP through the reference),
    "pass" (the chunked form with the pass kernel) or "wy" (the tensor-core chunked kernels of
    `alloy.metal.gated_delta_wy`), both with the VJP through the MLX chunked form."""
    from alloy import metal
    from alloy.metal.gated_delta_recurrent import gated_delta_recurrent
    from alloy.metal.gated_delta_wy import gated_delta_wy

    chunked_vjp = lambda *a: gated_delta_chunked(*a, l2norm, _PASS_CHUNK)  # noqa: E731
    if form == "wy":
        return metal.differentiable(lambda *a: gated_delta_wy(*a, l2norm), chunked_vjp)
    if form == "pass":
        return metal.differentiable(
            lambda *a: gated_delta_chunked(*a, l2norm, _PASS_CHUNK, pass_kernel=True), chunked_vjp)
    return metal.differentiable(lambda *a: gated_delta_recurrent(*a, l2norm),
                                lambda *a: gated_delta_ref(*a, l2norm))


def kernel_applies(q, v) -> bool:
    """Static facts under which `impl="auto"` takes the GPU kernels: a GPU, the recurrent kernel's
    shape limits, and element offsets that fit the kernels' 32-bit ints (with a chunk of padding)."""
    from alloy import metal
    from alloy.metal.gated_delta_recurrent import applies

    return metal.backend() is not None and applies(q, v) and _fits_int32(q, v)


def _fits_int32(q, v) -> bool:
    """The kernels' element offsets (with a chunk of padding) fit their 32-bit ints."""
    from alloy.metal.prelude import fits_int32

    B, T, _, K = q.shape
    H, V = v.shape[2], v.shape[3]
    return fits_int32(B, H, T + _PASS_CHUNK, max(K, V))


def gated_delta(q, k, v, g, beta, initial_state=None, l2norm: bool = True, chunk_size: int = 64,
                impl: str = "auto"):
    """Public gated delta rule. impl: "ref", "chunked", "kernel" or "auto" (the kernels on a GPU,
    else the recurrent reference for T == 1 and the chunked form). The kernel path: up to 64 tokens
    the recurrent kernel (`alloy.metal.gated_delta_recurrent`, gradient through the reference);
    beyond, for 16-bit inputs with K = 128 and one decay per head, the tensor-core chunked kernels
    (`alloy.metal.gated_delta_wy`), else the chunked form with its sweep across chunks in
    `alloy.metal.gated_delta_chunked` (both with the gradient through the MLX chunked form)."""
    if impl == "ref":
        return gated_delta_ref(q, k, v, g, beta, initial_state, l2norm)
    if impl == "chunked":
        return gated_delta_chunked(q, k, v, g, beta, initial_state, l2norm, chunk_size)
    if impl not in ("auto", "kernel"):
        raise ValueError(f"gated_delta: impl must be 'auto', 'ref', 'chunked' or 'kernel', got {impl!r}")
    T = q.shape[1]
    if impl == "kernel" or kernel_applies(q, v):
        from alloy import metal

        if metal.backend() is None:
            raise ValueError("gated_delta: impl='kernel' needs a CUDA or Metal default device")
        _check(q, k, v, g, beta)
        if not _fits_int32(q, v):
            raise ValueError(f"gated_delta: impl='kernel' indexes with 32-bit ints: batch x heads x (length + "
                             f"{_PASS_CHUNK}) x max(K, V) must stay below 2^31, got q {tuple(q.shape)}, "
                             f"v {tuple(v.shape)}; use impl='auto' (the MLX chunked form there) or split the batch")
        B, _, _, K = q.shape
        H, V = v.shape[2], v.shape[3]
        s = mx.zeros((B, H, K, V), mx.float32) if initial_state is None else initial_state.astype(mx.float32)
        from alloy.metal.gated_delta_chunked import applies as pass_applies
        from alloy.metal.gated_delta_wy import applies as wy_applies

        form = "recurrent"
        if T > _RECURRENT_MAX_T:
            form = "wy" if wy_applies(q, k, v, g) else "pass" if pass_applies(K, _PASS_CHUNK) else form
        return _kernel_path(form, bool(l2norm))(q, k, v, g, beta, s)
    if T == 1:
        return gated_delta_ref(q, k, v, g, beta, initial_state, l2norm)
    return gated_delta_chunked(q, k, v, g, beta, initial_state, l2norm, min(chunk_size, max(8, T)))
