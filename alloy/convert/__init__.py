"""Hugging Face <-> Alloy conversion (config mapping, tensor renaming, strict checks)."""
from alloy.convert.hf import hf_to_alloy_config, load_hf, save_hf  # noqa: F401
from alloy.convert.registry import Converter, get_converter, register_converter  # noqa: F401
