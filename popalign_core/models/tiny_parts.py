"""Pieces shared by the tiny UNet models (`models.tiny`) and the tiny flow models (`models.tiny_flow`)."""

from __future__ import annotations

TINY_IMAGE_SIZE = 32


def tiny_text_encoder_config(hidden_act: str = "quick_gelu", hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if hidden_act == "quick_gelu" else 0,
    )
