"""Analytical per-layer costs, one cost function per registered layer kind.

A cost function maps a layer's settings and a ``Workload`` (what one call processes) to a ``Cost``
of element counts; dtypes turn counts into bytes later (``alloy.roofline.report``), so one cost
function serves every precision. Registering is one decorator, keyed like the layer registry::

    @register_cost("mamba2")              # role "mixer" (default) or register_cost("mlp", role="ffn")
    def mamba2_cost(s: Mamba2Settings, w: Workload) -> Cost: ...

Notation: B batch, T new tokens per row, C tokens already cached per row, N = B*T, D d_model.

Counting rules (every cost function follows them; docs/roofline.md works examples by hand):

* FLOPs, by category: ``matmul`` (projections, 2*N*d_in*d_out each), ``attention`` (QK^T and PV:
  4*head_dim per visible (query, key) pair per query head; causal and sliding-window visibility
  counted exactly), ``chunked`` (the batched-matmul terms of chunked scans: Mamba-2 SSD, the
  Gated DeltaNet WY form), ``scan`` (elementwise recurrences, decode steps and depthwise
  convolutions, run in fp32 SIMT).
  Norms, activations, gates, softmax and RoPE are not counted (O(N*D), negligible).
* Weights: ``params`` are the stored parameters; ``weight_reads`` what one call reads (equal for
  layers; an embedding gathers only the rows it needs). Tags: ``matrix`` (projection and embedding
  matrices; stored in the weight format, e.g. 4-bit), ``vector`` (norms, biases, conv kernels; in
  the activation dtype), ``fp32`` (A_log, D, dt_bias and Mamba-1's A_log: kept in float32).
* Activations (activation dtype): each matmul / scan / attention kernel reads its inputs and writes
  its output once; elementwise ops are fused into a neighbour (the pre-norm into the next
  projection, the gate into the output projection, the residual add into the output projection,
  which therefore also reads the residual stream: + N*D per sub-block, counted by the stack).
* State (per call): ``kv`` (attention K/V cache, KV dtype), ``ssm`` (recurrent state, float32),
  ``conv`` (conv tail, activation dtype). State is read when the call continues a context (C > 0)
  and written always (a prefill leaves the cache for decoding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

FLOP_CATEGORIES = ("matmul", "attention", "chunked", "scan")
WEIGHT_TAGS = ("matrix", "vector", "fp32")
STATE_TAGS = ("kv", "ssm", "conv")


@dataclass(frozen=True)
class Workload:
    """One call: ``batch`` rows, ``tokens`` new tokens per row, ``context`` cached tokens per row."""

    batch: int
    tokens: int
    context: int = 0

    def __post_init__(self):
        for f in ("batch", "tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Workload.{f} must be a positive int, got {v!r}")
        if not isinstance(self.context, int) or isinstance(self.context, bool) or self.context < 0:
            raise ValueError(f"Workload.context must be a non-negative int, got {self.context!r}")

    @property
    def n(self) -> int:
        """Tokens processed in the call, N = B*T."""
        return self.batch * self.tokens


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass(frozen=True)
class Cost:
    """Element counts of one call of one layer (see the module docstring for the categories)."""

    flops: dict = field(default_factory=dict)  # category -> FLOPs
    params: dict = field(default_factory=dict)  # weight tag -> stored parameters
    weight_reads: dict = field(default_factory=dict)  # weight tag -> parameters read
    act_read: float = 0
    act_write: float = 0
    state_read: dict = field(default_factory=dict)  # state tag -> elements
    state_write: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("flops", FLOP_CATEGORIES), ("params", WEIGHT_TAGS),
                              ("weight_reads", WEIGHT_TAGS), ("state_read", STATE_TAGS),
                              ("state_write", STATE_TAGS)):
            bad = sorted(set(getattr(self, name)) - set(allowed))
            if bad:
                raise ValueError(f"Cost.{name}: unknown key(s) {bad}; allowed: {list(allowed)}")

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(_add(self.flops, o.flops), _add(self.params, o.params),
                    _add(self.weight_reads, o.weight_reads), self.act_read + o.act_read,
                    self.act_write + o.act_write, _add(self.state_read, o.state_read),
                    _add(self.state_write, o.state_write))

    def scale(self, k: float) -> "Cost":
        m = lambda d: {key: v * k for key, v in d.items()}  # noqa: E731
        return Cost(m(self.flops), m(self.params), m(self.weight_reads), self.act_read * k,
                    self.act_write * k, m(self.state_read), m(self.state_write))

    @property
    def total_flops(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def n_params(self) -> float:
        return float(sum(self.params.values()))


def weights(**tags) -> Cost:
    """Parameters stored and read once per call (``matrix=``, ``vector=``, ``fp32=`` counts)."""
    tags = {k: v for k, v in tags.items() if v}
    return Cost(params=tags, weight_reads=dict(tags))


def matmul(n: int, d_in: int, d_out: int, bias: bool = False) -> Cost:
    """A projection x (n, d_in) @ W^T (d_out, d_in): FLOPs and weights only (traffic is per kind)."""
    return Cost(flops={"matmul": 2 * n * d_in * d_out}) + weights(matrix=d_in * d_out, vector=d_out if bias else 0)


def visible_pairs(tokens: int, context: int, window: int = 0) -> int:
    """Visible (query, key) pairs of one row and head: sum_{i<T} min(W, C + i + 1).

    Query i of the call sits at position C + i and sees every earlier key and itself (causal),
    or only the last ``window`` of them (sliding window; 0 = unlimited).
    """
    lo, hi = context + 1, context + tokens  # keys visible to the first and to the last query
    if not window or window >= hi:
        return tokens * (lo + hi) // 2
    if window <= lo:
        return tokens * window
    return (lo + window - 1) * (window - lo) // 2 + (hi - window + 1) * window


def pairs_in_chunks(tokens: int, chunk: int) -> int:
    """Causal (l >= s) pairs inside the chunks of a T-token row cut into chunks of ``chunk``."""
    full, rest = divmod(tokens, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------

_COSTS: dict[str, dict[str, Callable]] = {"mixer": {}, "ffn": {}}


def register_cost(kind: str, *, role: str = "mixer", replace: bool = False):
    """Decorator registering ``fn(settings, workload) -> Cost`` for a layer kind."""
    if role not in _COSTS:
        raise ValueError(f"register_cost({kind!r}): role must be 'mixer' or 'ffn', got {role!r}")

    def deco(fn):
        if kind in _COSTS[role] and not replace:
            raise ValueError(f"{role} cost for kind {kind!r} is already registered (pass replace=True)")
        _COSTS[role][kind] = fn
        return fn

    return deco


def get_cost(role: str, kind: str) -> Callable:
    try:
        return _COSTS[role][kind]
    except KeyError:
        raise ValueError(
            f"no roofline cost registered for {role} kind {kind!r}; register one with "
            f"@alloy.roofline.register_cost({kind!r}{'' if role == 'mixer' else ', role=' + repr(role)}) "
            f"(registered: {sorted(_COSTS[role])})") from None


def registered_costs(role: str) -> list[str]:
    return sorted(_COSTS[role])


# ----------------------------------------------------------------------------------------------
# built-in kinds
# ----------------------------------------------------------------------------------------------


@register_cost("mlp", role="ffn")
def mlp_cost(s, w: Workload) -> Cost:
    """[gate;up] = x W (one fused read of x), h = act(gate) * up, out = h W_down.

    matmul 2*N*D*F*(3 gated | 2 plain); reads N*D + N*F*(2|1); writes N*F*(2|1) + N*D."""
    N, D, F = w.n, s.d_model, s.ff
    k = 2 if s.gated else 1
    c = matmul(N, D, F, s.bias).scale(k) + matmul(N, F, D, s.bias)
    return c + Cost(act_read=N * D + k * N * F, act_write=k * N * F + N * D)


def _ssd_flops(s, w: Workload) -> dict:
    """Mamba-2 scan FLOPs. T == 1: one recurrent step (fp32 elementwise, ``scan``); T > 1: the
    chunked SSD (``chunked``) with chunk Q = min(chunk_size, T), c = ceil(T / Q) chunks per row:

        intra-chunk  B * pairs * (2*g*n + h + 2*h*p)   C B^T per group, decay mask, (L∘CB) X per head
        chunk states 2 * N * h * p * n                  sum_s decay_s B_s ⊗ (Δx)_s
        state pass   2 * B * c * h * p * n              h_k = decay_k h_{k-1} + s_k
        state -> y   2 * N * h * p * n                  C_t · h_chunk (times the decay)
        skip & Δx    3 * N * h * p
    with pairs = causal pairs inside the chunks (``pairs_in_chunks``)."""
    B, T, N = w.batch, w.tokens, w.n
    h, p, n, g = s.n_heads, s.head_dim, s.d_state, s.n_groups
    if T == 1:
        return {"scan": B * (5 * h * p * n + 3 * h * p)}  # dA*h + Δx⊗B (3), C·h (2); skip, Δx
    Q = min(s.chunk_size, T)
    c = math.ceil(T / Q)
    intra = B * pairs_in_chunks(T, Q) * (2 * g * n + h + 2 * h * p)
    return {"chunked": intra + 4 * N * h * p * n + 2 * B * c * h * p * n + 3 * N * h * p}


@register_cost("mamba2")
def mamba2_cost(s, w: Workload) -> Cost:
    """in_proj (D -> 2*di + 2*g*n + h), conv over xBC, SSD scan, gated norm, out_proj (di -> D).

    Traffic: in_proj reads N*D, writes N*d_in_proj; the conv reads/writes N*conv_dim; the scan
    reads x, B, C (N*conv_dim) and dt (N*h) and writes y (N*di); out_proj reads y and z (2*N*di)
    and writes N*D. State: conv B*(d_conv-1)*conv_dim, ssm B*h*p*n (fp32)."""
    N, D, di = w.n, s.d_model, s.d_inner
    gn, h = s.n_groups * s.d_state, s.n_heads
    d_in_proj = 2 * di + 2 * gn + h
    conv_dim = s.conv_dim
    c = matmul(N, D, d_in_proj, s.bias) + matmul(N, di, D, s.bias)
    c += weights(vector=s.d_conv * conv_dim + (conv_dim if s.conv_bias else 0) + (di if s.rms_norm else 0),
                 fp32=3 * h)
    c += Cost(flops=_add({"scan": 2 * N * conv_dim * s.d_conv}, _ssd_flops(s, w)))
    c += Cost(act_read=N * D + N * conv_dim + N * (conv_dim + h) + 2 * N * di,
              act_write=N * d_in_proj + N * conv_dim + N * di + N * D)
    conv_state = w.batch * (s.d_conv - 1) * conv_dim
    ssm_state = w.batch * h * s.head_dim * s.d_state
    read = {"conv": conv_state, "ssm": ssm_state} if w.context else {}
    return c + Cost(state_read=read, state_write={"conv": conv_state, "ssm": ssm_state})


@register_cost("mamba1")
def mamba1_cost(s, w: Workload) -> Cost:
    """in_proj (D -> 2*di), conv over x, x_proj (di -> r + 2n), dt_proj (r -> di), selective scan
    (7 FLOPs per (token, channel, state) + 3 per (token, channel), fp32), out_proj (di -> D).

    Traffic: in_proj N*D -> 2*N*di; conv N*di -> N*di; x_proj N*di -> N*(r+2n); dt_proj N*r -> N*di;
    scan reads x, dt, z (3*N*di) and B, C (2*N*n), writes N*di; out_proj N*di -> N*D.
    State: conv B*(d_conv-1)*di, ssm B*di*n (fp32)."""
    N, D, di, r, n = w.n, s.d_model, s.d_inner, s.rank, s.d_state
    c = (matmul(N, D, 2 * di, s.bias) + matmul(N, di, r + 2 * n) + matmul(N, r, di, bias=True)
         + matmul(N, di, D, s.bias))
    # Jamba's dt/B/C RMSNorm weights; Zamba's per-head x_proj / dt_proj have the same sizes and FLOPs
    c += weights(vector=s.d_conv * di + (di if s.conv_bias else 0)
                 + (r + 2 * n if s.dt_bc_norm and s.dt_bc_norm_weight else 0), fp32=di * n + di)
    c += Cost(flops={"scan": 2 * N * di * s.d_conv + 7 * N * di * n + 3 * N * di})
    c += Cost(act_read=N * D + N * di + N * di + N * r + (3 * N * di + 2 * N * n) + N * di,
              act_write=2 * N * di + N * di + N * (r + 2 * n) + N * di + N * di + N * D)
    conv_state = w.batch * (s.d_conv - 1) * di
    ssm_state = w.batch * di * n
    read = {"conv": conv_state, "ssm": ssm_state} if w.context else {}
    return c + Cost(state_read=read, state_write={"conv": conv_state, "ssm": ssm_state})


def _attention_cost(s, w: Workload) -> Cost:
    """Fused q/k/v projection (D -> (Hq + 2*Hkv)*hd), attention core, o_proj (Hq*hd -> D).

    attention FLOPs 4*hd*Hq*B*pairs with pairs = ``visible_pairs(T, C, window)``.
    Traffic: qkv reads N*D, writes N*(Hq+2*Hkv)*hd; the core reads q and the new k, v and writes
    N*Hq*hd; o_proj reads N*Hq*hd, writes N*D. KV state: reads the cached keys and values a query
    can see, 2*B*Hkv*hd*min(C, window or C); writes the new ones, 2*B*Hkv*hd*min(T, window or T)
    (a sliding-window cache is a ring of ``window`` slots: only the last ``window`` keys are kept)."""
    N, D, hd, Hq, Hkv = w.n, s.d_model, s.hd, s.n_heads, s.kv_heads
    qkv = (Hq * (2 if s.output_gate else 1) + 2 * Hkv) * hd  # an output gate doubles q_proj's rows
    c = matmul(N, D, qkv, s.qkv_bias) + matmul(N, Hq * hd, s.d_out or D, s.o_bias)
    c += weights(vector=2 * hd if s.qk_norm else 0)
    c += Cost(flops={"attention": 4 * hd * Hq * w.batch * visible_pairs(w.tokens, w.context, s.window)})
    c += Cost(act_read=N * D + N * qkv + N * Hq * hd, act_write=N * qkv + N * Hq * hd + N * D)
    cached = min(w.context, s.window) if s.window else w.context
    read = {"kv": 2 * w.batch * Hkv * hd * cached} if cached else {}
    kept = min(w.tokens, s.window) if s.window else w.tokens
    return c + Cost(state_read=read, state_write={"kv": 2 * w.batch * Hkv * hd * kept})


register_cost("attention")(_attention_cost)
register_cost("sliding_attention")(_attention_cost)


@register_cost("gated_deltanet")
def gated_deltanet_cost(s, w: Workload) -> Cost:
    """in_proj_qkv (D -> 2*Hk*K + H*V), in_proj_z (D -> H*V), in_proj_b, in_proj_a (D -> H), conv over
    qkv, the gated delta rule, gated norm, out_proj (H*V -> D). H value heads of V, keys of K.

    Delta rule, per row and value head. T == 1: one recurrent step (``scan``), 7*K*V + 2*V (decay,
    S^T k, the correction, the rank-one write, the read). T > 1: the chunked WY form (``chunked``),
    chunk Q = min(chunk_size, T):
        intra-chunk  pairs * (2K [k k^T] + 2K [W = A (beta k)] + 2V [U = A (beta v)] + 2K [q k^T]
                     + 2V [(q k^T) U])  with pairs = causal pairs inside the chunks
        solve        sum over chunks of q(q-1)(q-2)/3  (inverting the unit lower-triangular q x q system)
        state        6*T*K*V  (W S, q S, and the state update k^T U)
    Traffic: the four input projections read N*D once and write N*(conv_dim + H*V + 2H); the conv
    reads/writes N*conv_dim; the rule reads q, k, v (N*conv_dim) and g, beta (2*N*H), writes N*H*V;
    out_proj reads o and z (2*N*H*V), writes N*D. State: conv B*(d_conv-1)*conv_dim, ssm B*H*K*V."""
    B, T, N, D = w.batch, w.tokens, w.n, s.d_model
    H, K, V = s.n_v_heads, s.head_k_dim, s.head_v_dim
    vd, conv_dim = s.value_dim, s.conv_dim
    c = (matmul(N, D, conv_dim) + matmul(N, D, vd) + matmul(N, D, H).scale(2) + matmul(N, vd, D))
    c += weights(vector=s.d_conv * conv_dim + (conv_dim if s.conv_bias else 0) + V, fp32=2 * H)
    if T == 1:
        rule = {"scan": B * H * (7 * K * V + 2 * V)}
    else:
        Q = min(s.chunk_size, T)
        full, rest = divmod(T, Q)
        solve = full * Q * (Q - 1) * (Q - 2) // 3 + rest * (rest - 1) * max(rest - 2, 0) // 3
        per_head = pairs_in_chunks(T, Q) * (6 * K + 4 * V) + solve + 6 * T * K * V
        rule = {"chunked": B * H * per_head}
    c += Cost(flops=_add({"scan": 2 * N * conv_dim * s.d_conv}, rule))
    c += Cost(act_read=N * D + N * conv_dim + N * (conv_dim + 2 * H) + 2 * N * vd,
              act_write=N * (conv_dim + vd + 2 * H) + N * conv_dim + N * vd + N * D)
    conv_state = B * (s.d_conv - 1) * conv_dim
    ssm_state = B * H * K * V
    read = {"conv": conv_state, "ssm": ssm_state} if w.context else {}
    return c + Cost(state_read=read, state_write={"conv": conv_state, "ssm": ssm_state})


@register_cost("short_conv")
def short_conv_cost(s, w: Workload) -> Cost:
    """in_proj (D -> 3D: b, c, x), y = c * conv(b * x) depthwise with ``kernel`` taps, out_proj (D -> D).

    Traffic: in_proj reads N*D, writes 3*N*D; the conv reads b and x (gate fused), writes N*D;
    out_proj reads y and c (2*N*D), writes N*D. State: conv B*(kernel-1)*D."""
    N, D, L = w.n, s.d_model, s.kernel
    c = matmul(N, D, 3 * D, s.bias) + matmul(N, D, D, s.bias)
    c += weights(vector=D * L + (D if s.bias else 0))
    c += Cost(flops={"scan": 2 * N * D * L}, act_read=N * D + 2 * N * D + 2 * N * D,
              act_write=3 * N * D + N * D + N * D)
    conv_state = w.batch * (L - 1) * D
    return c + Cost(state_read={"conv": conv_state} if w.context else {}, state_write={"conv": conv_state})


@register_cost("parallel")
def parallel_cost(s, w: Workload) -> Cost:
    """Branches that read the same input and add their outputs (Falcon-H1): the sum of the branch
    kinds' registered costs, plus the running sum read by each branch after the first ((n-1)*N*D;
    the add is fused into that branch's output projection)."""
    c = Cost(act_read=(len(s.branches) - 1) * w.n * s.d_model)
    for _, kind, settings in s.branches:
        c = c + get_cost("mixer", kind)(settings, w)
    return c


@register_cost("rglru")
def rglru_cost(s, w: Workload) -> Cost:
    """linear_y, linear_x (D -> W), block-diagonal input and recurrence gates (H blocks of bw = W/H:
    2 * 2*N*W*bw), depthwise conv (K taps), the RG-LRU recurrence, linear_out (W -> D).

    scan FLOPs: conv 2*N*W*K plus 10 per (token, channel) for the gate nonlinearities, a, sqrt(1 - a^2),
    the gated input and the recurrence h = a h + x (fp32). Traffic: the two input projections read N*D
    and write 2*N*W; the conv reads/writes N*W; gates and recurrence read x (N*W) and write h (N*W);
    linear_out reads h and y (2*N*W) and writes N*D. State: conv B*(K-1)*W, h B*W (fp32)."""
    N, D, W, K = w.n, s.d_model, s.w, s.conv_width
    bw = W // s.n_heads
    c = matmul(N, D, W, True).scale(2) + matmul(N, W, D, True)
    c += Cost(flops={"matmul": 2 * 2 * N * W * bw}) + weights(matrix=2 * W * bw, vector=2 * W + W * K + W + W)
    c += Cost(flops={"scan": 2 * N * W * K + 10 * N * W})
    c += Cost(act_read=N * D + N * W + N * W + 2 * N * W, act_write=2 * N * W + N * W + N * W + N * D)
    conv_state, h_state = w.batch * (K - 1) * W, w.batch * W
    read = {"conv": conv_state, "ssm": h_state} if w.context else {}
    return c + Cost(state_read=read, state_write={"conv": conv_state, "ssm": h_state})


@register_cost("mla")
def mla_cost(s, w: Workload) -> Cost:
    """Multi-head latent attention: q (D -> H*(nope+rope), or through a q_lora_rank bottleneck),
    kv_a (D -> r + rope), kv_b expanding every visible latent (r -> H*(nope+v); the cached context
    is re-expanded each call), attention core (2*(nope+rope) + 2*v per visible pair and head),
    o_proj (H*v -> D). State: the latent cache B*(r + rope) per token (read: the context; write: the
    new tokens). Traffic: projections read N*D; the core reads q and the expanded keys/values."""
    N, D, H = w.n, s.d_model, s.n_heads
    qk, v, r, rd = s.qk_head_dim, s.v_head_dim, s.kv_lora_rank, s.qk_rope_head_dim
    c = (matmul(N, D, s.q_lora_rank, s.bias) + matmul(N, s.q_lora_rank, H * qk)) if s.q_lora_rank \
        else matmul(N, D, H * qk)
    c += matmul(N, D, r + rd, s.bias) + matmul(N, H * v, D, s.bias)
    keys = w.batch * (w.context + w.tokens)
    c += Cost(flops={"matmul": 2 * keys * r * H * (s.qk_nope_head_dim + v)},
              params={"matrix": r * H * (s.qk_nope_head_dim + v)},
              weight_reads={"matrix": r * H * (s.qk_nope_head_dim + v)})
    c += weights(vector=r + (s.q_lora_rank or 0))
    c += Cost(flops={"attention": 2 * (qk + v) * H * w.batch * visible_pairs(w.tokens, w.context)})
    c += Cost(act_read=N * D + N * H * qk + keys * H * (qk + v), act_write=N * H * qk + N * (r + rd) + N * H * v + N * D)
    read = {"kv": w.batch * w.context * (r + rd)} if w.context else {}
    return c + Cost(state_read=read, state_write={"kv": w.batch * w.tokens * (r + rd)})


@register_cost("kda")
def kda_cost(s, w: Workload) -> Cost:
    """Kimi Delta Attention: q/k/v projections (D -> H*hd each), conv over the three, the low-rank
    forget gate (D -> hd -> H*hd) and output gate (same shape), b_proj (D -> H), the per-channel
    delta rule, gated norm, o_proj (H*hd -> D). Delta rule FLOPs as Gated DeltaNet's with K = V = hd
    (per-channel decays add one exp per (pair, channel) inside the chunk: counted as ``chunked``
    2*pairs*K). Traffic: like gated_deltanet. State: conv B*(K-1)*3*H*hd, ssm B*H*hd*hd."""
    from types import SimpleNamespace
    N, D, H, hd = w.n, s.d_model, s.n_heads, s.head_dim
    Q = H * hd
    c = matmul(N, D, Q).scale(3) + matmul(N, D, hd).scale(2) + matmul(N, hd, Q).scale(2) + matmul(N, D, H) \
        + matmul(N, Q, D)
    c += weights(vector=s.d_conv * 3 * Q + hd, fp32=Q + H)
    core = SimpleNamespace(d_model=D, n_v_heads=H, n_k_heads=H, head_k_dim=hd, head_v_dim=hd, value_dim=Q,
                           conv_dim=3 * Q, d_conv=s.d_conv, chunk_size=s.chunk_size, conv_bias=False)
    rule = gated_deltanet_cost(core, w)
    extra = 0 if w.tokens == 1 else 2 * w.batch * H * pairs_in_chunks(w.tokens, min(s.chunk_size, w.tokens)) * hd
    c += Cost(flops=_add({k: v for k, v in rule.flops.items() if k != "matmul"}, {"chunked": extra} if extra else {}))
    c += Cost(act_read=rule.act_read, act_write=rule.act_write)
    return c + Cost(state_read=rule.state_read, state_write=rule.state_write)


@register_cost("lightning")
def lightning_cost(s, w: Workload) -> Cost:
    """qkv_proj (D -> 3*H*hd), output_gate (D -> H*hd), the decayed linear attention (the SSD
    recurrence with one group per head, n = p = hd: ``_ssd_flops``), norm and gate, out_proj
    (H*hd -> D). Traffic: projections read N*D and write 4*N*H*hd; the core reads q, k, v and writes
    o (4*N*H*hd); norm + gate read o and the gate (2*N*H*hd); out_proj writes N*D.
    State: ssm B*H*hd*hd (fp32)."""
    from types import SimpleNamespace
    N, D, H, hd = w.n, s.d_model, s.n_heads, s.hd
    c = matmul(N, D, 3 * H * hd) + matmul(N, D, H * hd) + matmul(N, H * hd, D)
    c += weights(vector=H * hd, fp32=H)
    core = SimpleNamespace(n_heads=H, head_dim=hd, d_state=hd, n_groups=H, chunk_size=s.chunk_size)
    c += Cost(flops=_ssd_flops(core, w))
    c += Cost(act_read=N * D + 3 * N * H * hd + 2 * N * H * hd, act_write=4 * N * H * hd + N * H * hd + N * D)
    ssm = w.batch * H * hd * hd
    return c + Cost(state_read={"ssm": ssm} if w.context else {}, state_write={"ssm": ssm})


def compressed_pairs(tokens: int, context: int, rate: int, topk: int = 0) -> int:
    """Visible (query, compressed entry) pairs of one row: query at position p sees the
    (p + 1) // rate complete windows, or at most ``topk`` of them (0 = all)."""
    total = 0
    for p in range(context, context + tokens):
        n = (p + 1) // rate
        total += min(n, topk) if topk else n
    return total


def _dsv4_cost(s, w: Workload) -> Cost:
    """DeepSeek-V4 attention (dsv4_sliding / hca / csa). Projections: q_a (D -> q_lora_rank), q_b
    (-> H*d), kv (D -> d), the grouped o_a (g groups of H*d/g -> o_lora_rank: 2*N*H*d*r) and o_b
    (g*r -> D); vectors q_a_norm, kv_norm, sinks. Attention: 4*d*H per visible pair, window pairs
    ``visible_pairs(T, C, window)`` plus compressed pairs ``compressed_pairs`` (csa: top-k).
    Compressed kinds (c = 2 for csa's overlapping windows, 1 for hca): kv_proj and gate_proj
    (D -> c*d), position_bias (m x c*d) and kv_norm (d); pooling 2*c*m*d ``scan`` FLOPs per entry
    completed in the call. csa's indexer: kv/gate (D -> 2*di), q_b (q_lora_rank -> Hi*di),
    weights_proj (D -> Hi), position_bias (m x 2*di), kv_norm (di); scores 2*Hi*di per (query, visible
    entry) pair (``attention``), pooling as above. Traffic: projections read N*D and write the q
    bottleneck, q, kv; the core reads q and writes o (N*H*d); o_a reads o, writes N*g*r; o_b writes N*D.
    State (``kv``): the window ring B*d*min(T, window) written (read: B*d*min(C, window)); entries
    B*(d + di) per completed window written (read: every entry so far); the raw-projection rings of
    R = c*m tokens, 2*B*min(T, R)*(c*d + 2*di) written (read with min(C, R))."""
    B, T, C, N, D = w.batch, w.tokens, w.context, w.n, s.d_model
    H, d, ql, g, r = s.n_heads, s.head_dim, s.q_lora_rank, s.o_groups, s.o_lora_rank
    c = matmul(N, D, ql) + matmul(N, ql, H * d) + matmul(N, D, d) + matmul(N, H * d // g, g * r) + matmul(N, g * r, D)
    c += weights(vector=ql + d + H)
    pairs = visible_pairs(T, C, s.window)
    c += Cost(act_read=N * D + N * ql + N * H * d + N * H * d, act_write=N * ql + N * H * d + N * d + N * H * d
              + N * g * r + N * D)
    kv_read, kv_write = B * d * min(C, s.window), B * d * min(T, s.window)
    if getattr(s, "compressed", False):
        m, cw = s.compress_rate, (2 if s.overlap else 1)
        di = s.index_head_dim if s.overlap else 0
        new = (C + T) // m - C // m  # windows completed in the call, per row
        c += matmul(N, D, cw * d).scale(2) + weights(vector=m * cw * d + d)
        scan = B * new * 2 * cw * m * d
        pairs_c = compressed_pairs(T, C, m, s.index_topk if s.overlap else 0)
        attn = 4 * d * H * B * (pairs + pairs_c)
        if s.overlap:
            Hi = s.index_n_heads
            c += matmul(N, D, 2 * di).scale(2) + matmul(N, ql, Hi * di) + matmul(N, D, Hi)
            c += weights(vector=m * 2 * di + di)
            scan += B * new * 2 * 2 * m * di
            attn += 2 * Hi * di * B * compressed_pairs(T, C, m)
        c += Cost(flops={"attention": attn, "scan": scan})
        ring = cw * d + 2 * di
        R = cw * m
        kv_read += B * (C // m) * (d + di) + 2 * B * min(C, R) * ring
        kv_write += B * new * (d + di) + 2 * B * min(T, R) * ring
    else:
        c += Cost(flops={"attention": 4 * d * H * B * pairs})
    return c + Cost(state_read={"kv": kv_read} if C else {}, state_write={"kv": kv_write})


for _kind in ("dsv4_sliding", "hca", "csa"):
    register_cost(_kind)(_dsv4_cost)


def experts_touched(n_experts: int, top_k: int, n_tokens: int) -> float:
    """Expected number of distinct experts that N tokens routed to top_k of E experts each touch,
    under uniform routing: E * (1 - (1 - k/E)^N)  (k for one token, -> E for many)."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** n_tokens)


@register_cost("moe", role="ffn")
def moe_cost(s, w: Workload) -> Cost:
    """Router (D -> E), k routed SwiGLU (or plain) experts of width F per token, optional shared
    expert (width Fs) with an optional sigmoid gate (D -> 1). With ``latent_dim`` L the experts
    work in width L (D below reads L for them) behind D -> L and L -> D projections.

    matmul 2*N*D*E + 2*N*k*D*F*(3|2) + 2*N*D*Fs*(3|2) [+ 2*N*D]. Weights stored: all E experts; read:
    the experts the call touches (``experts_touched``, uniform routing), router and shared expert.
    Traffic: router reads N*D, writes N*E; experts read N*k*D, write N*k*F*(2|1); down reads
    N*k*F*(2|1), writes N*k*D; the weighted sum reads N*k*D, writes N*D; the shared expert as an MLP."""
    N, D, E, k, F = w.n, s.d_model, s.n_experts, s.top_k, s.ff
    m = 3 if s.gated else 2
    g = m - 1
    X = s.latent_dim or D  # experts' width: D, or the latent L with D -> L and L -> D projections
    c = matmul(N, D, E, s.router_bias)
    if s.latent_dim:
        c += matmul(N, D, X) + matmul(N, X, D)
    c += Cost(flops={"matmul": 2 * N * k * X * F * m}, params={"matrix": E * F * X * m},
              weight_reads={"matrix": experts_touched(E, k, N) * F * X * m})
    c += Cost(act_read=N * X + N * k * X + g * N * k * F + N * k * X,
              act_write=N * E + g * N * k * F + N * k * X + N * X)
    if s.shared_d_ff:
        Fs = s.shared_d_ff
        c += matmul(N, D, Fs).scale(g) + matmul(N, Fs, D)
        c += Cost(act_read=N * D + g * N * Fs, act_write=g * N * Fs + N * D)
        if s.shared_gate:
            c += matmul(N, D, 1)
    return c


@register_cost("hash_moe", role="ffn")
def hash_moe_cost(s, w: Workload) -> Cost:
    """As ``moe`` (the router still scores every expert: the chosen ones are weighted by their
    scores), plus the (vocab, top_k) int32 table tid2eid (tagged ``fp32``: four bytes each), of which
    a call reads the rows of its tokens (min(N, vocab))."""
    rows = min(w.n, s.vocab_size)
    return moe_cost(s, w) + Cost(params={"fp32": s.vocab_size * s.top_k}, weight_reads={"fp32": rows * s.top_k})


# ----------------------------------------------------------------------------------------------
# the stack around the layers
# ----------------------------------------------------------------------------------------------


def block_cost(d_model: int, has_ffn: bool, w: Workload, streams: int = 0) -> Cost:
    """Pre-norm weights and the residual stream read by each sub-block's output projection.

    With hyper-connections (``streams`` n > 0) each sub-block also projects the n*D streams to its
    (2 + n)*n mixing logits (matmul; fn, base and 3 scales stored), reads the streams to collapse and
    to mix them and writes the n new streams: act_read 2*N*n*D instead of N*D, act_write N*n*D."""
    k = 2 if has_ffn else 1
    if not streams:
        return weights(vector=k * d_model) + Cost(act_read=k * w.n * d_model)
    n, m = streams, (2 + streams) * streams
    one = matmul(w.n, n * d_model, m) + weights(vector=d_model + m + 3) \
        + Cost(act_read=2 * w.n * n * d_model, act_write=w.n * n * d_model)
    return one.scale(k)


def hyper_head_cost(d_model: int, streams: int, w: Workload) -> Cost:
    """The final collapse of n streams: n*D -> n logits, base (n) and one scale; reads the streams."""
    n = streams
    return matmul(w.n, n * d_model, n) + weights(vector=n + 1) + Cost(act_read=w.n * n * d_model,
                                                                       act_write=w.n * d_model)


def shared_cost(sh, w: Workload) -> Cost:
    """One call of a Zamba-style shared block (the report counts it once per call site): the block's
    attention on [h, e0] (2D wide in, D out, its own KV state), its MLP, the per-call low-rank
    adapters (r*(in + out) per target) and the per-call D x D linear. Weights read: the block's at
    every call. Stored parameters: the adapters and linear per call, plus the blocks' own
    parameters spread evenly over the calls (n_blocks / n_calls of one block each), so the total
    over the calls is exact."""
    D = sh.mlp.d_model
    block = get_cost("mixer", "attention")(sh.attention, w) + get_cost("ffn", "mlp")(sh.mlp, w) \
        + weights(vector=3 * D) + Cost(act_read=2 * w.n * D)
    own = matmul(w.n, D, D)
    for name in sh.adapt if sh.adapter_rank else ():
        a = sh.attention
        q_rows = a.n_heads * a.hd * (2 if a.output_gate else 1)
        d_in, d_out = ((a.d_model, q_rows if name == "q_proj" else a.kv_heads * a.hd)
                       if name in ("q_proj", "k_proj", "v_proj") else (D, sh.mlp.ff))
        own = own + matmul(w.n, d_in, sh.adapter_rank) + matmul(w.n, sh.adapter_rank, d_out)
    share = sh.n_blocks / len(sh.at)
    c = block + own
    return Cost(c.flops, _add({k: v * share for k, v in block.params.items()}, own.params), c.weight_reads,
                c.act_read, c.act_write, c.state_read, c.state_write)


def embed_cost(vocab: int, d_model: int, tied: bool, w: Workload) -> Cost:
    """Gather N rows (min(N, V) distinct rows read) and write N*D. The table is stored here; a tied
    head reads it again in full."""
    rows = min(w.n, vocab)
    return Cost(params={"matrix": vocab * d_model}, weight_reads={"matrix": rows * d_model},
                act_write=w.n * d_model)


def head_cost(vocab: int, d_model: int, tied: bool, w: Workload) -> Cost:
    """Final norm then logits = h W^T for every position: 2*N*D*V FLOPs, reads the V*D table and
    N*D, writes N*V logits (as ``model.apply`` does)."""
    N = w.n
    c = Cost(flops={"matmul": 2 * N * d_model * vocab}, weight_reads={"matrix": vocab * d_model})
    if not tied:
        c += Cost(params={"matrix": vocab * d_model})
    return c + weights(vector=d_model) + Cost(act_read=N * d_model, act_write=N * vocab)
