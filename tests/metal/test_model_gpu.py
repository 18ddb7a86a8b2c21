"""The training-path fusions of a whole hybrid model on the GPU (`pytest -m gpu`; skipped where no CUDA
or Metal device): the residual add carried into the next norm (`alloy.layers.stack.FUSED_ADD_NORM`),
gate and up as one matmul with the packed SwiGLU kernels (`alloy.layers.mlp.PACKED_GATE_UP`) and
Mamba-2's in_proj as three products (`alloy.layers.mamba2.SPLIT_IN_PROJ`), or two with dt passed
through the conv (`DT_IN_CONV`), all on against all off: logits and every parameter's gradient."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from alloy import metal
from alloy.layers import mamba2, mlp, stack
from alloy.metal.testing import rel_err
from alloy.model import build

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(metal.backend() is None, reason="no CUDA or Metal GPU backend")]


@pytest.mark.parametrize("dtype,tol", [("float32", 5e-3), ("bfloat16", 6e-2)])
def test_training_fusions_match_the_unfused_model(monkeypatch, dtype, tol):
    cfg = {"name": "m", "vocab_size": 256, "d_model": 256, "layer_types": ["mamba2", "attention", "mamba2"],
           "dtype": dtype, "tie_embeddings": True,
           "mixers": {"mamba2": {"d_state": 64, "head_dim": 64}, "attention": {"n_heads": 4, "n_kv_heads": 2}},
           "ffns": {"mlp": {"d_ff": 512}}}
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 600)))  # 1200 rows: the packed paths apply

    def run(on):
        for mod, name in ((stack, "FUSED_ADD_NORM"), (mlp, "PACKED_GATE_UP"), (mamba2, "SPLIT_IN_PROJ"),
                          (mamba2, "DT_IN_CONV")):
            monkeypatch.setattr(mod, name, on)
        m = build(cfg)
        params = m.init(mx.random.key(1))
        loss = lambda p: m.apply(p, tokens)[0].astype(mx.float32).square().mean()  # noqa: E731
        return m.apply(params, tokens)[0], mx.grad(loss)(params)

    (y1, g1), (y0, g0) = run(True), run(False)
    assert rel_err(y1, y0) <= tol
    for (name, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g0)):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
