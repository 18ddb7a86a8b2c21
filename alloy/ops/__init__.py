"""Pure math: ``*_ref`` reference implementations (the specification) and one public dispatcher
per op (``impl="auto"`` picks a path from static facts: backend, shapes, dtype)."""
from alloy.ops.activations import ACTIVATIONS, activation, relu2, swiglu, swiglu_packed  # noqa: F401
from alloy.ops.attention import attention, attention_ref, causal_mask, visibility_mask  # noqa: F401
from alloy.ops.conv import causal_conv1d, causal_conv1d_ref  # noqa: F401
from alloy.ops.loss import cross_entropy  # noqa: F401
from alloy.ops.norm import add_rms_norm, gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: F401
from alloy.ops.rope import rope, rope_ref  # noqa: F401
from alloy.ops.selective_scan import (  # noqa: F401
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_scan_step,
)
from alloy.ops.ssd import ssd, ssd_chunked, ssd_ref, ssd_step  # noqa: F401
