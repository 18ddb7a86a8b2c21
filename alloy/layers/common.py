"""Small helpers shared by layer files.

``dense`` and ``embed`` accept a full-precision linear ``{"weight": (out, in), "bias"?}`` or an
affine group-quantized one ``{"weight": uint32 (out, in*bits/32), "scales", "biases": (out,
in/group_size), "bias"?}`` (see ``alloy.params.quantize``): the presence of ``scales`` selects
``mx.quantized_matmul``; bits and group size are read off the shapes, so nothing else is stored.

Per-row valid lengths: a mixer state may carry ``valid`` (B,) int32, the number of real tokens of
this call in each row (the rest is right padding). ``live_mask`` and ``conv_tail`` help layers
honour it.
"""
from __future__ import annotations

import functools
import itertools

import mlx.core as mx


def quant_layout(p: dict, d_in: int) -> tuple[int, int]:
    """(bits, group_size) of a quantized linear whose input width is ``d_in``."""
    packed, groups = p["weight"].shape[-1], p["scales"].shape[-1]
    bits, group_size = packed * 32 // d_in, d_in // groups
    if bits * d_in != packed * 32 or group_size * groups != d_in:
        raise ValueError(f"quantized linear: weight {tuple(p['weight'].shape)} / scales "
                         f"{tuple(p['scales'].shape)} do not fit an input width of {d_in}")
    return bits, group_size


def decode_linear(p: dict, x: mx.array, norm_weight=None, norm_groups: int = 0, eps: float = 1e-6,
                  out_shape=None, residual=None) -> mx.array:
    """Inference-only linear for the few-row decode paths of stateful layers (no VJP on the GPU path):
    y = xn W^T (+ b) (+ residual), xn = x, or its grouped RMSNorm (``norm_groups`` >= 1 groups, fp32
    statistics) times ``norm_weight``. On a GPU with a plain float weight this is one launch
    (``alloy.metal.gemv``); otherwise ``rms_norm`` + ``dense`` (+ the residual add)."""
    from alloy import metal
    from alloy.metal import gemv
    from alloy.ops.norm import rms_norm

    if ("scales" not in p and "lora_A" not in p and metal.backend() is not None
            and gemv.applies(x, p["weight"]) and (norm_groups == 0 or x.shape[-1] % norm_groups == 0)):
        return gemv.gemv(x, p["weight"], p.get("bias"), norm_weight, norm_groups, eps, out_shape, residual)
    if norm_groups == 1:
        x = rms_norm(x, norm_weight, eps)
    elif norm_groups:
        shape = x.shape
        g = x.reshape(*shape[:-1], norm_groups, shape[-1] // norm_groups)
        x = (mx.fast.rms_norm(g, None, eps).reshape(shape) * norm_weight.astype(x.dtype))
    y = dense(p, x)
    y = y if out_shape is None else y.reshape(out_shape)
    return y if residual is None else residual + y


# Plain float linears of at least LINEAR_VJP_MIN_ROWS rows multiply through `matmul_t`, whose written-out
# gradient takes dW = dy^T x from its GEMM in W's own (out, in) layout. MLX's matmul VJP of x @ W.T gives
# (x^T dy)^T, a transposed view, which the cast to the float32 masters (and, for MLP's stacked gate / up
# weights, the concatenation's row slices) then copies element by element (strided `copy_g_nd`).
LINEAR_VJP = True
LINEAR_VJP_MIN_ROWS = 1024


@mx.custom_function
def _matmul_t_vjp(x, w):
    return x @ w.T


@_matmul_t_vjp.vjp
def _matmul_t_grads(primals, cotangent, output):
    x, w = primals
    d2 = cotangent.astype(x.dtype).reshape(-1, w.shape[0])
    return (d2 @ w).reshape(x.shape), (d2.T @ x.reshape(-1, x.shape[-1])).astype(w.dtype)


def matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T for a float weight w (out, in); with `LINEAR_VJP` and at least LINEAR_VJP_MIN_ROWS rows
    of x, through a custom VJP whose weight gradient comes out contiguous in w's layout (same values:
    dx = dy w, dw = dy^T x)."""
    if LINEAR_VJP and w.ndim == 2 and x.ndim >= 2 and x.size // x.shape[-1] >= LINEAR_VJP_MIN_ROWS:
        return _matmul_t_vjp(x, w)
    return x @ w.T


def dense(p: dict, x: mx.array) -> mx.array:
    """y = x W^T (+ b) for an HF-layout linear {"weight": (out, in), "bias"?: (out,)}, or its
    quantized form (``scales`` present): y = x dequant(W)^T (+ b) via ``mx.quantized_matmul``.
    A linear may also carry an unmerged low-rank delta ``lora_A`` (r, in), ``lora_B`` (out, r)
    (Zamba2's per-call adapters): y += (x A^T) B^T."""
    if "scales" in p:
        bits, gs = quant_layout(p, x.shape[-1])
        y = mx.quantized_matmul(x, p["weight"], p["scales"], p["biases"], transpose=True,
                                group_size=gs, bits=bits)
    else:
        y = matmul_t(x, p["weight"])
    if "lora_A" in p:  # an unmerged low-rank delta riding on the linear: + (x A^T) B^T
        y = y + (x @ p["lora_A"].T) @ p["lora_B"].T
    if "bias" in p:
        y = y + p["bias"]
    return y


def plain_linear(p: dict) -> bool:
    """A dense linear with no quantization or unmerged low-rank delta: its weight can be sliced or
    stacked with others."""
    return set(p) <= {"weight", "bias"}


@functools.lru_cache(maxsize=None)
def _split_matmul(widths: tuple):
    """x @ W^T as len(widths) separate products against W's row blocks, with a written-out gradient:
    dx accumulated by `mx.addmm` (the GEMM adds into its C input: no sum of separate products) and
    dW as one array."""

    @mx.custom_function
    def f(x, w):
        outs, o = [], 0
        for n in widths:
            outs.append(x @ w[o:o + n].T)
            o += n
        return tuple(outs)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        x, w = primals
        x2 = x.reshape(-1, x.shape[-1])
        dx, dws, o = None, [], 0
        for n, d in zip(widths, cotangents):
            d2 = d.astype(x.dtype).reshape(-1, n)
            dx = d2 @ w[o:o + n] if dx is None else mx.addmm(dx, d2, w[o:o + n])
            dws.append(d2.T @ x2)
            o += n
        return dx.reshape(x.shape), mx.concatenate(dws, axis=0).astype(w.dtype)

    return f


def dense_split(p: dict, x: mx.array, widths) -> tuple:
    """``mx.split(dense(p, x), ...)`` into pieces of the given widths (summing to the output width),
    each computed as its own product so that each comes out contiguous (a consumer that needs
    contiguous input, e.g. a kernel, copies nothing), and their gradients meet in one accumulating
    matmul instead of a concatenation. Falls back to `dense` + split for a quantized linear or one
    carrying a low-rank delta."""
    widths = tuple(int(n) for n in widths)
    if sum(widths) != p["weight"].shape[0] or min(widths) < 1:
        raise ValueError(f"dense_split: widths {widths} must be positive and sum to the output width "
                         f"{p['weight'].shape[0]}")
    ends = list(itertools.accumulate(widths))
    if not plain_linear(p):
        return tuple(mx.split(dense(p, x), ends[:-1], axis=-1))
    outs = _split_matmul(widths)(x, p["weight"])
    if "bias" in p:
        outs = tuple(y + p["bias"][e - n:e] for y, n, e in zip(outs, widths, ends))
    return tuple(outs)


# Tables of at most this many rows take their lookup gradient as one-hot^T @ cotangent (one GEMM)
# instead of a scatter-add: with a byte-level vocabulary every row receives thousands of updates,
# and the scatter's atomics (in the table's dtype) serialize on them (0.4 ms of the toy train step on
# an H100, docs/benchmarks.md session 8).
ONEHOT_GRAD_MAX_ROWS = 4096


# On a GPU, tables of at most this many rows are also read as one-hot @ table (one small GEMM, exact:
# each output is one row times 1): MLX-CUDA's gather wrote the toy step's 32768 x 768 bf16 rows at
# ~0.26 TB/s (0.19 ms, docs/benchmarks.md session 9). On the CPU the gather is cheaper.
ONEHOT_LOOKUP_MAX_ROWS = 512


def _onehot(tokens, rows: int, dtype):
    return (tokens.reshape(-1, 1) == mx.arange(rows, dtype=tokens.dtype)).astype(dtype)


@mx.custom_function
def _take_rows(w, tokens):
    from alloy import metal

    if metal.backend() is not None and w.shape[0] <= ONEHOT_LOOKUP_MAX_ROWS:
        return (_onehot(tokens, w.shape[0], w.dtype) @ w).reshape(*tokens.shape, w.shape[1])
    return w[tokens]


@_take_rows.vjp
def _take_rows_vjp(primals, cotangent, output):
    w, tokens = primals
    ct = cotangent.reshape(-1, w.shape[1])
    return (_onehot(tokens, w.shape[0], ct.dtype).T @ ct).astype(w.dtype), mx.zeros(tokens.shape, tokens.dtype)


def embed(p: dict, tokens: mx.array, d_model: int) -> mx.array:
    """Rows of the (vocab, d_model) table ``p["weight"]`` at ``tokens``; dequantized per row when
    the table is quantized."""
    if "scales" in p:
        bits, gs = quant_layout(p, d_model)
        return mx.dequantize(p["weight"][tokens], p["scales"][tokens], p["biases"][tokens],
                             group_size=gs, bits=bits)
    if p["weight"].shape[0] <= ONEHOT_GRAD_MAX_ROWS:
        return _take_rows(p["weight"], tokens)
    return p["weight"][tokens]


def live_mask(valid: mx.array, T: int) -> mx.array:
    """(B, T) bool: token t of row b is real (t < valid[b])."""
    return mx.arange(T, dtype=mx.int32)[None, :] < valid[:, None]


def conv_tail(state: mx.array, x: mx.array, valid: mx.array) -> mx.array:
    """The conv state after only the first ``valid[b]`` tokens of ``x`` in each row.

    state (B, K-1, C) the last K-1 inputs before this call; x (B, T, C) this call's conv inputs;
    returns concat(state, x)[b, valid[b] : valid[b] + K-1] — with valid == T, ``xp[:, T:]``.
    """
    km1 = state.shape[1]
    xp = mx.concatenate([state.astype(x.dtype), x], axis=1)
    idx = valid[:, None].astype(mx.int32) + mx.arange(km1, dtype=mx.int32)[None, :]
    return mx.take_along_axis(xp, idx[..., None], axis=1)


def dtype_of(name: str):
    return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]
