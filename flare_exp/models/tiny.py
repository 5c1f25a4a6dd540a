"""Build a tiny, randomly initialised Qwen3-VL (model + tokenizer + processor) on local disk.

Used by the embedded demo and the tests: every stage runs its real transformers / PEFT / TRL code path on
CPU with it, offline, in seconds. The tokenizer is a byte-level BPE trained on a small medical-flavoured
corpus and carries the Qwen chat/vision special tokens and a chat template with the same structure as
Qwen3-VL's, so prompts, image placeholders and the generation prompt behave like the real model's.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same structure as Qwen3-VL-Instruct's template: <|im_start|>role\n ... <|im_end|>\n, one
# <|vision_start|><|image_pad|><|vision_end|> per image part, and "<|im_start|>assistant\n" as the
# generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS = """
The heart size is normal. The lungs are clear. No pneumothorax or pleural effusion. The mediastinum is
unremarkable. Degenerative changes of the thoracic spine. No acute cardiopulmonary abnormality.
Cardiomegaly with mild pulmonary edema. Right lower lobe opacity concerning for pneumonia.
Pneumonia, Effusion, Atelectasis, Nodule, Mass, Infiltration, No Finding.
Caries; Periapical Lesion; Endodontic Treatment, Restorative Treatment, and Complications; Impacted Tooth.
Which option best describes the image? A B C D E F G H I J K. Answer with the option letter.
What is the bone resorption percentage? 22.9 35.1 12.0 percent %. Describe the lungs. Describe the bones.
Examine the medical image thoroughly and generate a report describing your findings.
0 1 2 3 4 5 6 7 8 9 , . ; : ( ) - /
"""


def _train_tokenizer(vocab_size: int, special_tokens: list[str] = SPECIAL_TOKENS, corpus: str = ""):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS + corpus] * 4, trainer=trainer)
    return tok


def build_tiny_qwen3vl(out_dir: str | Path, seed: int = 0, vocab_size: int = 600,
                       min_pixels: int = 32 * 32, max_pixels: int = 128 * 128) -> Path:
    """Write a tiny random Qwen3-VL checkpoint to ``out_dir`` (atomically) and return the path."""
    import torch
    from transformers import (Qwen2TokenizerFast, Qwen2VLImageProcessorFast, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    backend = _train_tokenizer(vocab_size)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 16
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
            # mrope sections (temporal, height, width) must add up to head_dim / 2.
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorFast(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    video_processor = Qwen3VLVideoProcessor()
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "flare_exp_tiny.json").write_text(json.dumps({"seed": seed, "kind": "tiny-random-qwen3vl"}))
        if out_dir.exists():  # a half-written dir from a crash: replace it
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built tiny Qwen3-VL at %s (%.2fM params)", out_dir, sum(p.numel() for p in model.parameters()) / 1e6)
    return out_dir


def build_tiny_causal_lm(out_dir: str | Path, seed: int = 0, vocab_size: int = 600, corpus: str = "") -> Path:
    """A tiny random Llama causal LM with a Llama tokenizer (``<s>`` / ``</s>`` / ``<unk>``, as GREEN's
    radllama2 judge has), for testing the GREEN judge's code path: ``add_eos_token=True`` works on it.
    ``corpus``: more text to train the tokenizer on (the benchmark's: GREEN's prompt, so it is short)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    tokenizer = LlamaTokenizerFast(tokenizer_object=_train_tokenizer(vocab_size, ["<unk>", "<s>", "</s>"], corpus),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True,
                                   add_eos_token=False, legacy=False, from_slow=False)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    tmp = Path(tempfile.mkdtemp(prefix=".judge-", dir=out_dir.parent if out_dir.parent.exists() else None))
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), out_dir)
    return out_dir
