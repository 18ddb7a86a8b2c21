"""Mamba-1 selective scan.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), Alg. 2,
with a diagonal A per channel and zero-order-hold-simplified B (B̄ = Δ B):

    h_t = exp(Δ_t A) ∘ h_{t-1} + (Δ_t x_t) B_t        h_t: (d, n)
    y_t = h_t C_t + D x_t ;   y_t ← y_t · silu(z_t)   (when a gate z is given)

Shapes (b batch, l length, d channels, n state size): x, dt, z (b, l, d), dt positive
(softplus and bias already applied), A (d, n) negative, B, C (b, l, n), D (d,) or None,
state (b, d, n) float32.

`selective_scan_ref` is the specification (a loop over time); `selective_scan_chunked` is a
log-depth parallel scan of (log decay, input) pairs; `selective_scan_step` is one decode step;
`selective_scan` dispatches on static facts. All recurrence math runs in float32; `y` comes
back in `x.dtype`, states are always float32.

On a CUDA or Metal default device with float inputs, `selective_scan(impl="auto")` runs the GPU
kernels: `alloy.metal.selective_scan_step` for T == 1 and `alloy.metal.selective_scan` (one
sequential sweep, state in registers) otherwise. Their gradients are those of
`selective_scan_step` / `selective_scan_chunked` (custom VJPs), so training may use either path.
"""
import functools
import math

import mlx.core as mx

from alloy import metal
from alloy.metal import selective_scan as _scan_kernel
from alloy.metal import selective_scan_step as _step_kernel

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_MAX_KERNEL_STATE = 256  # state entries per channel the scan kernel keeps in registers

_F32 = mx.float32


def _check(x, dt, A, B, C, D, z, state, decode=False):
    """Validate shapes; raise ValueError naming the offending argument."""
    nd = 2 if decode else 3
    if x.ndim != nd:
        raise ValueError(f"x must have {nd} dims, got shape {x.shape}")
    if not decode and x.shape[1] == 0:
        raise ValueError("x has length 0")
    lead, d = x.shape[:-1], x.shape[-1]
    if dt.shape != x.shape:
        raise ValueError(f"dt must have the shape of x {x.shape}, got {dt.shape}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape {(d, 'n')}, got {A.shape}")
    n = A.shape[1]
    for name, v in (("B", B), ("C", C)):
        if v.shape != (*lead, n):
            raise ValueError(f"{name} must have shape {(*lead, n)}, got {v.shape}")
    if D is not None and D.shape != (d,):
        raise ValueError(f"D must have shape {(d,)}, got {D.shape}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {x.shape}, got {z.shape}")
    if state is not None and state.shape != (x.shape[0], d, n):
        raise ValueError(f"state must have shape {(x.shape[0], d, n)}, got {state.shape}")


def _readout(h, C, x, D, z, dtype):
    """y = h C + D x, gated by silu(z); h (..., d, n), C (..., n), x/z (..., d)."""
    y = (h * C.astype(_F32)[..., None, :]).sum(-1)
    if D is not None:
        y = y + D.astype(_F32) * x.astype(_F32)
    if z is not None:
        y = y * mx.sigmoid(z.astype(_F32)) * z.astype(_F32)
    return y.astype(dtype)


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, initial_state=None):
    """Sequential reference: one step per token, read straight off the recurrence.

    x, dt (b, l, d), A (d, n), B/C (b, l, n), D (d,) | None, z (b, l, d) | None,
    initial_state (b, d, n) | None  ->  y (b, l, d) in x.dtype, state (b, d, n) f32.
    """
    _check(x, dt, A, B, C, D, z, initial_state)
    b, l, d = x.shape
    n = A.shape[1]
    xf, dtf, Af = x.astype(_F32), dt.astype(_F32), A.astype(_F32)
    Bf, Cf = B.astype(_F32), C.astype(_F32)
    h = mx.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    ys = []
    for t in range(l):
        # 1. discretize: Ā_t = exp(Δ_t A), B̄_t x_t = (Δ_t x_t) B_t
        dA = mx.exp(dtf[:, t, :, None] * Af)  # (b, d, n)
        dBx = (dtf[:, t] * xf[:, t])[:, :, None] * Bf[:, t, None, :]  # (b, d, n)
        # 2. recurrence: h_t = Ā_t ∘ h_{t-1} + B̄_t x_t
        h = dA * h + dBx
        # 3. readout: y_t = h_t C_t
        ys.append((h * Cf[:, t, None, :]).sum(-1))  # (b, d)
    y = mx.stack(ys, axis=1)
    # 4. skip connection y += D x, then the gate y *= silu(z)
    if D is not None:
        y = y + D.astype(_F32) * xf
    if z is not None:
        zf = z.astype(_F32)
        y = y * (zf * mx.sigmoid(zf))
    return y.astype(x.dtype), h


def _shift(v, s, axis):
    """v shifted by s along `axis` (towards later positions), zero filled at the front."""
    widths = [(0, 0)] * v.ndim
    widths[axis] = (s, 0)
    keep = [slice(None)] * v.ndim
    keep[axis] = slice(0, v.shape[axis])
    return mx.pad(v, widths)[tuple(keep)]


def _scan_pairs(la, u, axis):
    """Inclusive Hillis–Steele scan of the affine maps h -> exp(la) h + u along `axis`.

    Composing (la1, u1) then (la2, u2) gives (la1 + la2, exp(la2) u1 + u2). The log decays
    are only ever summed (never differenced), so every exp sees a non-positive argument.
    A zero-filled shift is the identity map (la = 0, u = 0).
    """
    s = 1
    while s < la.shape[axis]:
        u = u + mx.exp(la) * _shift(u, s, axis)
        la = la + _shift(la, s, axis)
        s *= 2
    return la, u


def selective_scan_chunked(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=64):
    """Parallel selective scan: scan inside every chunk at once, scan the chunk carries,
    then fix up each position with the state entering its chunk.

    Same arguments and results as `selective_scan_ref`; any length (T is padded to a
    multiple of `chunk_size` with dt = 0: decay 1, no input, so the final state is exact).
    Materializes per-step states (b, l, d, n) in float32.
    """
    _check(x, dt, A, B, C, D, z, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    b, l, d = x.shape
    n = A.shape[1]
    K = chunk_size
    pad = -l % K
    c = (l + pad) // K

    def chunks(v):  # (b, l, ...) f32 -> (b, c, K, ...), zero padded at the end
        if pad:
            v = mx.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(b, c, K, *v.shape[2:])

    xf, dtf = x.astype(_F32), dt.astype(_F32)
    # 1. discretize: log decay Δ A (<= 0) and input (Δ x) B for every (t, d, n)
    la = chunks(dtf[..., None] * A.astype(_F32))  # (b, c, K, d, n)
    u = chunks((dtf * xf)[..., None] * B.astype(_F32)[:, :, None, :])
    # 2. within every chunk: inclusive scan from a zero state
    la, u = _scan_pairs(la, u, axis=2)
    # 3. across chunks: scan the chunk totals, led by the map "start at h0"
    h0 = mx.zeros((b, 1, d, n), _F32) if initial_state is None else initial_state.astype(_F32)[:, None]
    ends = _scan_pairs(
        mx.concatenate([mx.zeros_like(h0), la[:, :, -1]], axis=1),
        mx.concatenate([h0, u[:, :, -1]], axis=1),
        axis=1,
    )[1]  # (b, c+1, d, n): h0, then the state at the end of each chunk
    starts, final_state = ends[:, :-1], ends[:, -1]
    # 4. fix-up: h_t = u_t + exp(la_t) h_chunk_start
    hs = (u + mx.exp(la) * starts[:, :, None]).reshape(b, c * K, d, n)[:, :l]
    y = _readout(hs, C, xf, D, z, x.dtype)
    return y, final_state


def selective_scan_step(x, dt, A, B, C, D, z, state):
    """One decode step. x, dt, z (b, d), A (d, n), B/C (b, n), D (d,) | None, z | None,
    state (b, d, n) f32 | None (zeros)  ->  y (b, d) in x.dtype, new state f32."""
    _check(x, dt, A, B, C, D, z, state, decode=True)
    b, d = x.shape
    xf, dtf = x.astype(_F32), dt.astype(_F32)
    if state is None:
        state = mx.zeros((b, d, A.shape[1]), _F32)
    dA = mx.exp(dtf[..., None] * A.astype(_F32))
    state = dA * state.astype(_F32) + (dtf * xf)[..., None] * B.astype(_F32)[:, None, :]
    return _readout(state, C, xf, D, z, x.dtype), state


def _balanced_chunk(T, chunk_size):
    """Chunk length for a T-token prefill: as few chunks as `chunk_size` allows, made
    equal and rounded up to a multiple of 8, so padding stays under 8 tokens per chunk."""
    n_chunks = math.ceil(T / chunk_size)
    return min(chunk_size, -(-math.ceil(T / n_chunks) // 8) * 8)


@functools.lru_cache(maxsize=None)
def _fused(step: bool, gated: bool):
    """Kernel with the VJP of the differentiable path; arguments (x, dt, A, B, C, D, [z,] state)."""
    kern = _step_kernel.selective_scan_step if step else _scan_kernel.selective_scan
    slow = selective_scan_step if step else selective_scan_chunked
    if gated:
        return metal.differentiable(
            lambda x, dt, A, B, C, D, z, s: kern(x, dt, A, B, C, D, z, s),
            lambda x, dt, A, B, C, D, z, s: slow(x, dt, A, B, C, D, z, s))
    return metal.differentiable(
        lambda x, dt, A, B, C, D, s: kern(x, dt, A, B, C, D, None, s),
        lambda x, dt, A, B, C, D, s: slow(x, dt, A, B, C, D, None, s))


def kernel_applies(x, A) -> bool:
    """Static facts under which `impl="auto"` takes the GPU kernels."""
    return (metal.backend() is not None and x.dtype in _FLOATS
            and A.shape[-1] <= _MAX_KERNEL_STATE)


def _scan_kernel_path(x, dt, A, B, C, D, z, initial_state):
    if metal.backend() is None:
        raise ValueError("selective_scan: impl='kernel' needs a CUDA or Metal default device")
    b, T, d = x.shape
    D = mx.zeros((d,), mx.float32) if D is None else D
    if initial_state is None:
        initial_state = mx.zeros((b, d, A.shape[1]), mx.float32)
    step = T == 1
    if step:
        x, dt, B, C, z = x[:, 0], dt[:, 0], B[:, 0], C[:, 0], None if z is None else z[:, 0]
    f = _fused(step, z is not None)
    args = (x, dt, A, B, C, D) + (() if z is None else (z,)) + (initial_state,)
    y, state = f(*args)
    return (y[:, None] if step else y), state


def selective_scan(x, dt, A, B, C, D=None, z=None, initial_state=None, chunk_size=64, impl="auto"):
    """Mamba-1 selective scan. Arguments as `selective_scan_ref`;
    returns (y (b, l, d), state (b, d, n) f32).

    impl: "ref" (sequential), "chunked", "kernel" (GPU kernels: a fused decode step for
    T == 1, else the fused forward scan), or "auto" (the kernels where `kernel_applies`;
    otherwise T == 1 -> one decode step; on the CPU the sequential scan — it materialises one
    (b, d, n) state per step where the chunked form materialises (b, chunk, d, n) blocks:
    `bench/cpu_scans.py`, docs/benchmarks.md; elsewhere chunked with a balanced chunk length
    <= chunk_size).
    """
    if impl not in ("auto", "ref", "chunked", "kernel"):
        raise ValueError(f"unknown selective_scan impl {impl!r}; "
                         "expected 'auto', 'ref', 'chunked' or 'kernel'")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if impl == "ref":
        return selective_scan_ref(x, dt, A, B, C, D, z, initial_state)
    if impl == "chunked":
        return selective_scan_chunked(x, dt, A, B, C, D, z, initial_state, chunk_size)
    _check(x, dt, A, B, C, D, z, initial_state)
    if impl == "kernel" or kernel_applies(x, A):
        return _scan_kernel_path(x, dt, A, B, C, D, z, initial_state)
    T = x.shape[1]
    if T == 1:
        zt = None if z is None else z[:, 0]
        y, state = selective_scan_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, zt, initial_state)
        return y[:, None], state
    if mx.default_device() == mx.cpu:
        return selective_scan_ref(x, dt, A, B, C, D, z, initial_state)
    return selective_scan_chunked(x, dt, A, B, C, D, z, initial_state, _balanced_chunk(T, chunk_size))
