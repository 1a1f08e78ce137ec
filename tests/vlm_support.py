"""A tiny Qwen2-VL checkpoint (random weights, built from a config: nothing downloaded) and its batches."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = 250
VISION_START, VISION_END = 252, 253
VOCAB = 256
PATCH_DIM = 3 * 1 * 4 * 4  # channels x temporal patch x patch x patch
APPLIANCE_ARGS = ["--device", "cpu", "--aux-layer-ids", "0,1,2"]  # 4 layers: the default aux ids need more


def make_tiny_vlm(folder: Path) -> Path:
    """Qwen2-VL with hidden 64, 4 decoder layers and a one-block vision tower, saved to ``folder``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 512,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 1,
            "in_channels": 3,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=251,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def vlm_batch(seed: int, *, rows: int = 2, length: int = 16, images: int = 1) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, loss_mask, vision)``: the first ``images`` rows hold one 4x4-patch
    image (4 placeholder tokens after merging), the others are text only; the last row is padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (rows, length), generator=gen)
    for row in range(images):
        ids[row, 2:8] = torch.tensor([VISION_START, *[IMAGE_TOKEN] * 4, VISION_END])
    attention = torch.ones_like(ids)
    if rows > 1:
        attention[-1, length - 3 :] = 0
    loss = attention.clone()
    loss[:, :2] = 0
    vision: dict[str, torch.Tensor] = {}
    if images:
        vision = {
            "pixel_values": torch.randn(16 * images, PATCH_DIM, generator=gen),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * images),
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
        }
    return ids, attention, loss, vision  # type: ignore[return-value]
