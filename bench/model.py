"""A Qwen3-VL-4B-shaped model with random weights (no download), saved to a local dir for the benchmarks.

Shapes follow Qwen3-VL-4B-Instruct's published config (4.44 B parameters). The tokenizer is flare-exp's
tiny byte-level BPE (special-token ids wired into the config): text is tokenised differently from the real
Qwen tokenizer, which only shifts how many tokens a sentence takes; image tokens are exact.
"""
from __future__ import annotations

import json
from pathlib import Path


def build_qwen3vl_4b_random(out_dir: str | Path, device: str = "cuda") -> Path:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    from flare_exp.fixtures.tiny_models import build_tiny_qwen3vl

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tiny = build_tiny_qwen3vl(out_dir.parent / "tokenizer-src", min_pixels=64 * 32 * 32,
                              max_pixels=1280 * 32 * 32)
    processor = Qwen3VLProcessor.from_pretrained(tiny)
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=262144, rope_theta=5_000_000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True},
                         eos_token_id=tiny_cfg["text_config"]["eos_token_id"],
                         pad_token_id=tiny_cfg["text_config"]["pad_token_id"]),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        image_token_id=tiny_cfg["image_token_id"], video_token_id=tiny_cfg["video_token_id"],
        vision_start_token_id=tiny_cfg["vision_start_token_id"],
        vision_end_token_id=tiny_cfg["vision_end_token_id"], tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen3VLForConditionalGeneration(config)
        torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = tiny_cfg["text_config"]["eos_token_id"]
    model.generation_config.pad_token_id = tiny_cfg["text_config"]["pad_token_id"]
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    (out_dir / "bench_model.json").write_text(json.dumps({"params": n}))
    del model
    torch.cuda.empty_cache()
    return out_dir
