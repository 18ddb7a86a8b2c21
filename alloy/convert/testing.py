"""Tiny configurations of every supported Hugging Face family, for parity tests and fixtures (the
live transformers tests and tests/parity/make_fixtures.py). Small widths, GQA where the family has
it, several SSM chunks. Takes the transformers module as an argument: no import of it here."""
V = 64

GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)


def configs(T):
    small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2)
    dec = dict(small, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": T.LlamaConfig(**dec, attention_bias=True, tie_word_embeddings=False),
        "llama3_rope": T.LlamaConfig(**dec, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 64}),
        "qwen2_linear_rope": T.Qwen2Config(**dec, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                   "rope_theta": 10000.0}),
        "mistral": T.MistralConfig(**{**dec, "num_key_value_heads": 1}, sliding_window=3),
        "qwen2": T.Qwen2Config(**dec),
        "qwen3": T.Qwen3Config(**dec, head_dim=16, tie_word_embeddings=True),
        "qwen3_yarn": T.Qwen3Config(**{**dec, "max_position_embeddings": 128}, head_dim=16,
                                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 32}),
        "mamba": T.MambaConfig(**small, state_size=8),
        "falcon_mamba": T.FalconMambaConfig(**small, state_size=8, mixer_rms_eps=1e-5),
        "mamba2": T.Mamba2Config(**small, num_heads=4, head_dim=16, state_size=8, n_groups=2, chunk_size=4),
        "qwen3_next": T.Qwen3NextConfig(**{**dec, "num_hidden_layers": 3}, head_dim=8, linear_num_key_heads=2,
                                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=24, mlp_only_layers=[1],
                                        layer_types=["linear_attention", "full_attention", "linear_attention"]),
        "lfm2": T.Lfm2Config(**{**dec, "num_hidden_layers": 3}, layer_types=["conv", "full_attention", "conv"]),
        "jamba": T.JambaConfig(**{**dec, "num_hidden_layers": 4}, num_experts=4, num_experts_per_tok=2,
                               mamba_d_state=8, mamba_dt_rank=4, attn_layer_period=2, attn_layer_offset=1,
                               expert_layer_period=2, expert_layer_offset=1),
        "nemotron_h": T.NemotronHConfig(**{**dec, "num_hidden_layers": 5}, head_dim=8, mamba_num_heads=4,
                                        mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=4,
                                        layers_block_type=["linear_attention", "mlp", "full_attention", "moe",
                                                           "linear_attention"],
                                        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                        moe_shared_expert_intermediate_size=24, routed_scaling_factor=1.5,
                                        n_group=2, topk_group=1, moe_latent_size=8),
        "qwen3_5_text": T.Qwen3_5TextConfig(**dec, head_dim=8, **GDN, layer_types=["linear_attention", "full_attention"]),
        "qwen3_5_moe_text": T.Qwen3_5MoeTextConfig(**dec, head_dim=8, **GDN, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                                   layer_types=["full_attention", "linear_attention"]),
        "granitemoehybrid": T.GraniteMoeHybridConfig(**{**dec, "num_hidden_layers": 3},
                                                     layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4,
                                                     mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4,
                                                     num_local_experts=4, num_experts_per_tok=2,
                                                     shared_intermediate_size=24, position_embedding_type="rope",
                                                     embedding_multiplier=2.0, residual_multiplier=0.5,
                                                     logits_scaling=3.0, attention_multiplier=0.3),
        "falcon_h1": T.FalconH1Config(**dec, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=8,
                                      mamba_n_groups=2, mamba_chunk_size=4, mamba_rms_norm=True,
                                      attention_in_multiplier=0.7, attention_out_multiplier=1.3, key_multiplier=0.8,
                                      ssm_in_multiplier=1.2, ssm_out_multiplier=0.9, embedding_multiplier=2.0,
                                      lm_head_multiplier=0.5, mlp_multipliers=[0.6, 1.4],
                                      ssm_multipliers=[0.5, 1.5, 0.8, 1.1, 0.9]),
        "falcon_h1_nonorm": T.FalconH1Config(**dec, mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64,
                                             mamba_d_state=8, mamba_chunk_size=4, mamba_rms_norm=False),
        "zamba2": T.Zamba2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=4, mamba_d_state=8, mamba_headdim=16,
                                 n_mamba_heads=4, chunk_size=4, num_mem_blocks=2, adapter_rank=4,
                                 layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"],
                                 use_shared_attention_adapter=True, use_mem_rope=True),
        "zamba": T.ZambaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                               num_attention_heads=4, num_key_value_heads=4, mamba_d_state=8, n_mamba_heads=2,
                               attn_layer_period=3, attn_layer_offset=2),
        "recurrent_gemma": T.RecurrentGemmaConfig(**{**dec, "num_key_value_heads": 1, "num_hidden_layers": 3},
                                                  lru_width=32, attention_window_size=5,
                                                  block_types=["recurrent", "recurrent", "attention"]),
        "minimax": T.MiniMaxConfig(**{**dec, "num_hidden_layers": 3}, head_dim=8, num_local_experts=4,
                                   num_experts_per_tok=2, block_size=4,
                                   layer_types=["linear_attention", "full_attention", "linear_attention"],
                                   linear_attn_alpha_factor=1.3, linear_attn_beta_factor=0.7,
                                   full_attn_alpha_factor=0.9, full_attn_beta_factor=1.2,
                                   mlp_alpha_factor=1.1, mlp_beta_factor=0.8),
        "kimi_linear": T.KimiLinearConfig(**{**dec, "num_hidden_layers": 3, "num_key_value_heads": 4}, linear_num_heads=2, linear_head_dim=8,
                                          layer_types=["linear_attention", "full_attention", "linear_attention"],
                                          mlp_layer_types=["dense", "sparse", "sparse"], kv_lora_rank=16,
                                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=12,
                                          num_experts=4, num_experts_per_token=2, moe_intermediate_size=16,
                                          num_expert_group=2, topk_group=1, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2),
        # every attention kind (window 6; CSA windows of 4 with top-3 selection, HCA windows of 8: a
        # 100-token prompt crosses 25 / 12 of them), hash-routed and routed MoE with clipping,
        # 3 hyper-connection streams, YaRN on the compressed branches
        "deepseek_v4": T.DeepseekV4Config(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=1, head_dim=16, q_lora_rank=12, partial_rotary_factor=0.5,
                                          o_groups=2, o_lora_rank=8, sliding_window=6,
                                          layer_types=["sliding_attention", "compressed_sparse_attention",
                                                       "heavily_compressed_attention", "compressed_sparse_attention"],
                                          mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
                                          compress_rates={"compressed_sparse_attention": 4,
                                                          "heavily_compressed_attention": 8},
                                          index_n_heads=8, index_head_dim=8, index_topk=3, n_routed_experts=4,
                                          num_experts_per_tok=2, moe_intermediate_size=16, hc_mult=3,
                                          hc_sinkhorn_iters=5, swiglu_limit=0.5, routed_scaling_factor=1.5,
                                          max_position_embeddings=256,
                                          rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 32}),
        "bamba": T.BambaConfig(**{**dec, "num_hidden_layers": 3}, attn_layer_indices=[1], mamba_n_heads=4,
                               mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4, mamba_n_groups=2),
    }




def perturb(model, torch, seed: int = 0, scale: float = 0.1):
    """Move every weight off its init value: zero out-projections, unit norms and zero LoRA B
    matrices would hide mapping bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():  # DeepSeek-V4's routing buffers start as zeros
            if name.endswith("tid2eid"):  # distinct random experts per token id
                E = model.config.n_routed_experts
                b.copy_(torch.argsort(torch.rand(b.shape[0], E, generator=g), dim=-1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias") and model.config.model_type == "deepseek_v4":
                b.add_(torch.randn(b.shape, generator=g) * scale)
    return model
