"""Turn prepared records into model inputs: chat text, images, SFT labels, generation batches.

Shared by sft (labels on the answer only), infer/eval (generation prompt, every view) and the length check
(a sample longer than model.max_seq_length is caught before training, never cut inside its image tokens).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from flare_exp.data.decoding import check_window, decode_image

IGNORE_INDEX = -100


def render_messages(messages: list[dict]) -> list[dict]:
    # The template needs only the part types; paths stay out so no processor tries to open them itself.
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p.get("type") == "image" else {"type": "text", "text": p["text"]}
                       for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def unreadable_image(record: dict, path: Path, error: Exception) -> ValueError:
    """An image of a prepared record that cannot be read now: moved, deleted or damaged since prepare checked it."""
    return ValueError(f"record {record.get('id')}: cannot read image {path}: {error}. The prepared records name "
                      "images prepare checked: re-run stage=prepare if the files changed")


class VisionChat:
    def __init__(self, processor, image_root: str | Path, image_device: str | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_root = Path(image_root)
        # Where the image processor resizes and patches (e.g. "cuda"): on the CPU it costs tens of ms per
        # 512-px view, as much as a decode step of the whole batch. None = the processor's default (CPU).
        self.image_device = image_device
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")

    # -- text -------------------------------------------------------------------------------------------
    def prompt_text(self, record: dict) -> str:
        user = [m for m in record["messages"] if m["role"] != "assistant"]
        return self.processor.apply_chat_template(render_messages(user), tokenize=False,
                                                  add_generation_prompt=True)

    def full_text(self, record: dict) -> str:
        return self.processor.apply_chat_template(render_messages(record["messages"]), tokenize=False,
                                                  add_generation_prompt=False)

    def answer_text(self, record: dict) -> str:
        """What the loss covers: everything the template puts after the generation prompt (answer + end token)."""
        prompt, full = self.prompt_text(record), self.full_text(record)
        if not full.startswith(prompt):
            raise ValueError(f"record {record.get('id')}: the chat template renders the prompt differently with "
                             "and without the answer; cannot locate the answer tokens")
        return full[len(prompt):]

    # -- images -----------------------------------------------------------------------------------------
    def image_paths(self, record: dict) -> list[Path]:
        return [self.image_root / p for p in record["images"]]

    def load_images(self, record: dict) -> list[Image.Image]:
        """The record's views as 8-bit RGB, by the decoding rule prepare applied (flare_exp.data.decoding),
        with the window prepare recorded (data.image_window)."""
        window = check_window(record.get("image_window"))
        images = []
        for path in self.image_paths(record):
            try:
                images.append(decode_image(path, window))
            except (OSError, ValueError) as e:
                raise unreadable_image(record, path, e) from None
        return images

    def image_tokens(self, width: int, height: int) -> int:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.processor.image_processor
        patch, merge = ip.patch_size, ip.merge_size
        size = getattr(ip, "size", None) or {}
        h, w = smart_resize(height, width, factor=patch * merge,
                            min_pixels=size.get("shortest_edge", getattr(ip, "min_pixels", 56 * 56)),
                            max_pixels=size.get("longest_edge", getattr(ip, "max_pixels", 28 * 28 * 1280)))
        return (h // patch) * (w // patch) // (merge * merge)

    def sequence_length(self, record: dict, with_answer: bool = True) -> int:
        """Tokens the sample will take, from image headers (no decoding) and the rendered text."""
        text = self.full_text(record) if with_answer else self.prompt_text(record)
        n = len(self.tokenizer(text, add_special_tokens=False).input_ids)
        for path in self.image_paths(record):
            try:
                with Image.open(path) as im:
                    size = im.size
            except (OSError, ValueError) as e:
                raise unreadable_image(record, path, e) from None
            n += self.image_tokens(*size) - 1  # the single placeholder expands to this many tokens
        return n

    # -- batches ----------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], records: list[dict], padding_side: str, images=None):
        images = images if images is not None else [self.load_images(r) for r in records]
        self.tokenizer.padding_side = padding_side
        flat = [im for ims in images for im in ims]
        device = {"device": self.image_device} if self.image_device and flat else {}
        return self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True, **device)

    def sft_batch(self, records: list[dict]) -> dict:
        """Inputs with labels on the answer tokens only (prompt, image and padding tokens = -100)."""
        import torch  # here: the settings checks import this module, and need no torch

        texts = [self.full_text(r) for r in records]
        batch = self._encode(texts, records, padding_side="right")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for i, record in enumerate(records):
            answer_ids = self.tokenizer(self.answer_text(record), add_special_tokens=False).input_ids
            end, n = int(lengths[i]), len(answer_ids)
            if batch["input_ids"][i, end - n:end].tolist() != answer_ids:
                raise ValueError(f"record {record.get('id')}: answer tokens not found at the end of the sequence")
            labels[i, end - n:end] = batch["input_ids"][i, end - n:end]
        batch["labels"] = labels
        return dict(batch)

    def generation_batch(self, records: list[dict], images: list[list[Image.Image]] | None = None) -> dict:
        """Prompts with the generation prompt and every view, left-padded for batched generation. ``images``:
        the records' pictures when already loaded (infer decodes the next batch's while this one generates)."""
        return dict(self._encode([self.prompt_text(r) for r in records], records, "left", images))


class SFTCollator:
    """SFT batches; with ``rope_index`` (flare_exp.models.rope_positions) also the multimodal rope positions,
    computed here on the CPU (in the data loader's workers) instead of in the model's forward on the GPU."""

    def __init__(self, chat: VisionChat, rope_index=None):
        self.chat, self.rope_index = chat, rope_index

    def __call__(self, records: list[dict]) -> dict:
        batch = self.chat.sft_batch(records)
        if self.rope_index is not None:
            batch["position_ids"] = self.rope_index(batch)
        return batch


def emptied(before: list[dict], after: list[dict], key: str) -> list[str]:
    """The values of ``key`` (task_type, dataset) that records before a filter had and none after it has: a
    whole task or dataset the length limit left out, which a count of skipped records does not show."""
    kept = {r.get(key) for r in after}
    return sorted({str(r.get(key)) for r in before if r.get(key) not in kept})


def filter_by_length(chat: VisionChat, records: list[dict], max_len: int, on_too_long: str,
                     with_answer: bool = True) -> tuple[list[dict], list[dict], list[int]]:
    """Split records into (fitting, too long, the fitting ones' token counts). on_too_long=error raises on the
    first one, naming it."""
    from tqdm.auto import tqdm

    keep, dropped, lengths = [], [], []
    for r in tqdm(records, desc="length check", unit="sample", disable=len(records) < 1000):
        n = chat.sequence_length(r, with_answer=with_answer)
        if n <= max_len:
            keep.append(r)
            lengths.append(n)
            continue
        if on_too_long == "error":
            raise ValueError(f"record {r.get('id')} needs {n} tokens > model.max_seq_length={max_len}; raise "
                             "model.max_seq_length, lower model.max_pixels, or set on_too_long=skip")
        dropped.append({"id": r.get("id"), "tokens": n})
    return keep, dropped, lengths
