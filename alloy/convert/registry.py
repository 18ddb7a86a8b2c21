"""Converters between Hugging Face checkpoints and Alloy trees, one per family.

A converter knows, for its ``model_type``s:

* ``config(hf: dict) -> dict``     an Alloy ``ModelConfig`` dict from an HF config.json;
* ``rename``                       ``(hf_prefix, alloy_prefix)`` pairs with ``{i}`` for a layer
                                   index, applied to tensor names in both directions;
* ``known``                        the HF config fields it understands or knowingly ignores —
                                   any other field is an error, never silently dropped;
* ``to_hf(cfg) -> dict``           (optional) the HF config for export, or None when the Alloy
                                   config is not of this family.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

# Fields every transformers config.json may carry that do not change the math.
COMMON_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
    "max_position_embeddings", "attention_dropout", "hidden_dropout", "use_return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "id2label", "label2id",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "add_cross_attention", "tf_legacy_loss", "use_bfloat16", "pruned_heads",
    "torchscript", "is_decoder", "cross_attention_hidden_size", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "typical_p", "temperature", "top_k", "top_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "num_beams", "num_beam_groups", "diversity_penalty",
    "do_sample", "early_stopping", "max_length", "min_length", "forced_bos_token_id",
    "forced_eos_token_id", "quantization_config_disabled", "pretraining_tp", "rescale_prenorm_residual",
    "residual_in_fp32", "time_step_floor", "time_step_min", "time_step_max", "time_step_scale",
    "time_step_init_scheme", "use_mambapy", "use_associative_scan", "attn_implementation",
})


@dataclass(frozen=True)
class Converter:
    model_types: tuple[str, ...]
    config: Callable[[dict], dict]
    rename: tuple[tuple[str, str], ...]
    known: frozenset = field(default_factory=frozenset)
    to_hf: Callable | None = None
    architecture: str = ""  # the HF class name written on export
    drop: tuple[str, ...] = ()  # HF tensor-name regexes that carry no weights for Alloy
    # tensor surgery beyond renaming (stack experts, split fused projections, norm offsets):
    load_hook: Callable | None = None  # (flat_hf, hf_config) -> flat_hf, before renaming
    save_hook: Callable | None = None  # (flat_hf, alloy_config) -> flat_hf, after renaming back


_CONVERTERS: dict[str, Converter] = {}


def register_converter(conv: Converter) -> Converter:
    for t in conv.model_types:
        _CONVERTERS[t] = conv
    return conv


def _ensure():
    from alloy.convert import families, hybrids  # noqa: F401  (imports register the families)


def get_converter(model_type: str) -> Converter:
    _ensure()
    try:
        return _CONVERTERS[model_type]
    except KeyError:
        raise ValueError(f"no converter for Hugging Face model_type {model_type!r}; "
                         f"supported: {sorted(_CONVERTERS)}") from None


def converters() -> list[Converter]:
    _ensure()
    return list(dict.fromkeys(_CONVERTERS.values()))


def _pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(r"\{i\}", r"(?P<i>\d+)"))


def rename_key(key: str, rules, reverse: bool = False, kind_of=None) -> str | None:
    """Map one tensor name through ``rules`` (longest matching prefix wins); None if none match.

    A rule is ``(hf_prefix, alloy_prefix)`` or ``(hf_prefix, alloy_prefix, mixer_kinds)``; the
    third form applies only to layers whose mixer kind (``kind_of(i)``) is listed, which is what
    makes the Alloy -> HF direction unambiguous when several HF modules map to ``mixer``.
    """
    best = None
    for rule in rules:
        hf, al = rule[0], rule[1]
        src, dst = (al, hf) if reverse else (hf, al)
        m = _pattern(src).match(key)
        if m and len(rule) > 2 and kind_of is not None and "i" in m.groupdict():
            if kind_of(int(m.group("i"))) not in rule[2]:
                continue
        if m and (best is None or len(m.group(0)) > best[0]):
            best = (len(m.group(0)), dst.replace("{i}", m.group("i")) if "i" in m.groupdict() else dst)
    if best is None:
        return None
    return best[1] + key[best[0]:]


def decoder_rules(mixers: dict, *, norm: str = "input_layernorm", ffn_norm: str = "post_attention_layernorm",
                  ffn: str = "mlp", final: str = "norm", extra: tuple = ()) -> tuple:
    """Rename rules for the common ``model.layers.{i}.<module>`` decoder layout.

    ``mixers`` maps an HF module name to the Alloy mixer kinds it holds (None: any kind), e.g.
    ``{"mamba": ("mamba2",), "self_attn": ("attention",)}``; ``extra`` adds family-specific rules
    (longest prefix wins, so ``mlp.gate.`` -> ``ffn.router.`` beats ``mlp.`` -> ``ffn.``)."""
    rules = [("model.embed_tokens.", "embed_tokens."), ("model.layers.{i}." + norm + ".", "layers.{i}.norm.")]
    for module, kinds in mixers.items():
        rule = ("model.layers.{i}." + module + ".", "layers.{i}.mixer.")
        rules.append(rule if kinds is None else (*rule, tuple(kinds)))
    rules += [("model.layers.{i}." + ffn_norm + ".", "layers.{i}.ffn_norm."), *extra,
              ("model.layers.{i}." + ffn + ".", "layers.{i}.ffn."), ("model." + final + ".", "norm_f."),
              ("lm_head.", "lm_head.")]
    return tuple(rules)


# -- tensor surgery shared by families ----------------------------------------------------------
_EXPERT = re.compile(r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def stack_experts(flat: dict) -> dict:
    """``...experts.{e}.{proj}.weight`` (per expert) -> ``...experts.{proj}.weight`` (E, out, in)."""
    import mlx.core as mx

    groups: dict[tuple[str, str], dict[int, object]] = {}
    out = {}
    for k, v in flat.items():
        m = _EXPERT.match(k)
        if m:
            groups.setdefault((m["pre"], m["proj"]), {})[int(m["e"])] = v
        else:
            out[k] = v
    for (pre, proj), by_e in groups.items():
        n = len(by_e)
        if sorted(by_e) != list(range(n)):
            raise ValueError(f"{pre}.*.{proj}: experts {sorted(by_e)} are not 0..{n - 1}")
        out[f"{pre}.{proj}.weight"] = mx.stack([by_e[e] for e in range(n)])
    return out


def unstack_experts(flat: dict) -> dict:
    """Inverse of ``stack_experts`` for every 3-D ``...experts.{proj}.weight``."""
    out = {}
    for k, v in flat.items():
        m = re.match(r"^(?P<pre>.*\.experts)\.(?P<proj>\w+)\.weight$", k)
        if m and v.ndim == 3:
            for e in range(v.shape[0]):
                out[f"{m['pre']}.{e}.{m['proj']}.weight"] = v[e]
        else:
            out[k] = v
    return out


def split_fused_experts(flat: dict) -> dict:
    """``experts.gate_up_proj`` (E, 2F, D) -> ``experts.gate_proj.weight`` + ``experts.up_proj.weight``;
    ``experts.down_proj`` (E, D, F) -> ``experts.down_proj.weight`` (the fused Hub storage)."""
    out = {}
    for k, v in flat.items():
        if k.endswith(".experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            F = v.shape[1] // 2
            out[pre + "gate_proj.weight"], out[pre + "up_proj.weight"] = v[:, :F], v[:, F:]
        elif k.endswith(".experts.down_proj") and v.ndim == 3:
            out[k + ".weight"] = v
        else:
            out[k] = v
    return out


def fuse_experts(flat: dict) -> dict:
    """Inverse of ``split_fused_experts``: ``experts.{gate,up}_proj.weight`` -> ``experts.gate_up_proj``
    (E, 2F, D); ``experts.down_proj.weight`` -> ``experts.down_proj``."""
    import mlx.core as mx

    out = {}
    for k, v in flat.items():
        if k.endswith(".experts.gate_proj.weight"):
            pre = k[: -len("gate_proj.weight")]
            out[pre + "gate_up_proj"] = mx.concatenate([v, flat[pre + "up_proj.weight"]], axis=1)
        elif k.endswith(".experts.up_proj.weight"):
            continue
        elif k.endswith(".experts.down_proj.weight"):
            out[k[: -len(".weight")]] = v
        else:
            out[k] = v
    return out
