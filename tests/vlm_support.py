"""A tiny Qwen2-VL checkpoint (random weights, built from a config: nothing downloaded) and its batches."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = 250
VIDEO_TOKEN = 251
VISION_START, VISION_END = 252, 253
VOCAB = 256
PATCH_DIM = 3 * 1 * 4 * 4  # channels x temporal patch x patch x patch
# No family-specific flags: with 4 layers the default EAGLE-3 aux ids do not fit, and the server
# still starts, serving every other capture (EAGLE-3 is refused saying to pass --aux-layer-ids).
APPLIANCE_ARGS = ["--device", "cpu"]


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
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


def split_device_map() -> str:
    """A ``--device-map`` for :func:`make_tiny_vlm`'s model: the vision tower, the embeddings and
    layers 0-1 on the CPU; layers 2-3, the norm and the LM head on disk (read back per forward)."""
    import json

    text = "model.language_model"
    entries = {"model.visual": "cpu", f"{text}.embed_tokens": "cpu", f"{text}.rotary_emb": "cpu"}
    entries |= {f"{text}.layers.{i}": "cpu" if i < 2 else "disk" for i in range(4)}
    entries |= {f"{text}.norm": "disk", "lm_head": "disk"}
    return json.dumps(entries)


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


# The ViSpec recipe's target folder: a Qwen2.5-VL (the smallest family the recipe's draft registry
# takes), a word-level tokenizer whose ids fit the 256-token vocabulary, an image processor for its
# 4x4 patches, and a ShareGPT-style data set with generated images.
_WORDS = ["user", "assistant", "system", "What", "colour", "is", "this", "square", "?", "It", "a", "."]
_WORDS += ["red", "green", "blue", "with", "and", "dots", "stripes"] + [str(i) for i in range(100)]
_SPECIALS = {
    "<|endoftext|>": 0,
    "[UNK]": 1,
    "<|image_pad|>": IMAGE_TOKEN,
    "<|video_pad|>": 251,
    "<|vision_start|>": VISION_START,
    "<|vision_end|>": VISION_END,
    "<|im_start|>": 254,
    "<|im_end|>": 255,
}
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROCESSOR_BOUNDS = {"min_pixels": 64, "max_pixels": 16 * 16 * 4}  # images of 8x8 to 32x32 pixels


def make_vispec_recipe_target(folder: Path, *, samples: int = 4) -> Path:
    """A Qwen2.5-VL target folder the ViSpec recipe reads: weights, tokenizer, image processor, data.

    Random weights from a seed (hidden 64, 4 decoder layers, a one-block vision tower with 4x4
    patches); ``meta.json`` names ``train.jsonl`` (ShareGPT rows, one ``<image>`` each, PNGs under
    ``images/``) for upstream's ``make_meta_dataset``. Nothing is downloaded.
    """
    import json

    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 512,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": False,
            "bos_token_id": _SPECIALS["<|endoftext|>"],
            "eos_token_id": _SPECIALS["<|im_end|>"],
            "initializer_range": 0.2,  # the recipe refuses a target whose embeddings look like N(0, 0.02)
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 1,
            "window_size": 16,
            "fullatt_block_indexes": [0],
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=_SPECIALS["<|video_pad|>"],
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=_SPECIALS["<|endoftext|>"],
        eos_token_id=_SPECIALS["<|im_end|>"],
        pad_token_id=_SPECIALS["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(folder)

    vocab = {word: i + 2 for i, word in enumerate(_WORDS)} | _SPECIALS
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in _SPECIALS if t not in ("[UNK]", "<|endoftext|>")],
        chat_template=_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=1, merge_size=2, **PROCESSOR_BOUNDS).save_pretrained(
        folder
    )
    (folder / "chat_template.jinja").write_text(_CHAT_TEMPLATE)

    images = folder / "images"
    images.mkdir(exist_ok=True)
    colours = ["red", "green", "blue"]
    with open(folder / "train.jsonl", "w") as f:
        for i in range(samples):
            gen = torch.Generator().manual_seed(100 + i)
            side = 16 if i % 2 == 0 else 24
            pixels = (torch.rand(side, side, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(images / f"{i}.png")
            answer = f"It is a {colours[i % 3]} square with {i} dots and {7 * i % 100} stripes ."
            row = {
                "messages": [
                    {"role": "user", "content": "<image>What colour is this square ?"},
                    {"role": "assistant", "content": answer},
                ],
                "images": [f"images/{i}.png"],
            }
            f.write(json.dumps(row) + "\n")
    (folder / "meta.json").write_text(json.dumps({"tiny": {"file_name": "train.jsonl", "media_dir": str(folder)}}))
    return folder
