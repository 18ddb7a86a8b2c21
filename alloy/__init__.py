"""Alloy: functional hybrid SSM-Attention language models on MLX.

    import alloy
    model = alloy.build(config)                 # ModelConfig, dict, or JSON path
    params = model.init(mx.random.key(0))
    logits, state = model.apply(params, tokens, model.init_state(batch, max_len))

The public names load lazily, so ``import alloy`` stays cheap and can run before ``mlx.core``
(it preloads a system OpenBLAS on Linux, see ``alloy._blas``).
"""
import importlib

from alloy import _blas  # noqa: F401  (must run before mlx.core is imported)

__version__ = "0.1.0"

_EXPORTS = {
    "build": "alloy.model", "Model": "alloy.model",
    "ModelConfig": "alloy.config",
    "load": "alloy.checkpoint", "save": "alloy.checkpoint",
    "LayerSettings": "alloy.layers.registry", "register_mixer": "alloy.layers.registry",
    "register_ffn": "alloy.layers.registry", "registered": "alloy.layers.registry",
    "generate": "alloy.inference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'alloy' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
