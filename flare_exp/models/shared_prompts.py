"""A batch whose rows repeat one prompt (GRPO's rollouts: ``num_generations`` copies of each prompt, images
included) prefilled once per distinct prompt: the distinct rows' forward fills a small cache, whose keys and
values are then copied to every row of the decode's static cache (``rl.shared_prompt_prefill``).

The prefill of 8 copies of a two-view report runs the vision encoder and the text decoder over 8 identical
inputs; here over one. The rows then decode apart (each draws its own tokens). Same math: a row's cache and
first-token logits are those of its prompt's own forward (batch shapes aside: in bf16 a matmul over another
number of rows may round differently).

Rows are the same prompt when every per-row input is equal (token ids, mask, token types) and so are their
images (grids and pixels). A batch with inputs this module does not know (videos, say) is prefilled whole.
"""
from __future__ import annotations

ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # (B, L) inputs
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # per image, rows' images one after another


def image_spans(batch: dict, vision_start_id: int | None) -> list[tuple[int, int, int, int]] | None:
    """Per row: (first image, end image, first patch, end patch) into image_grid_thw / pixel_values; None when
    the images cannot be told apart by row."""
    import torch

    if batch.get("pixel_values") is None:
        return [(0, 0, 0, 0)] * batch["input_ids"].shape[0]
    if vision_start_id is None or batch.get("image_grid_thw") is None:
        return None
    per_row = (batch["input_ids"] == vision_start_id).sum(1).tolist()
    patches = batch["image_grid_thw"].prod(-1).tolist()
    if sum(per_row) != len(patches) or sum(patches) != batch["pixel_values"].shape[0]:
        return None
    image_ends = torch.tensor(per_row).cumsum(0).tolist()
    patch_ends = [0, *torch.tensor(patches).cumsum(0).tolist()]
    spans, start = [], 0
    for end in image_ends:
        spans.append((start, end, patch_ends[start], patch_ends[end]))
        start = end
    return spans


def repeated_rows(batch: dict, spans):
    """(the first row of each distinct prompt (U,), each row's distinct prompt (B,)) as index tensors on the
    batch's device, or None when every row is its own prompt or the batch holds inputs not known here
    (``spans``: image_spans)."""
    import torch

    if set(batch) - set(ROW_KEYS) - set(IMAGE_KEYS):
        return None
    rows = batch["input_ids"].shape[0]
    if rows < 2 or spans is None:
        return None
    host = {key: batch[key].cpu() for key in ROW_KEYS if batch.get(key) is not None}
    grids = batch["image_grid_thw"].cpu() if batch.get("pixel_values") is not None else None

    def same(a: int, b: int) -> bool:
        (i0, i1, p0, p1), (j0, j1, q0, q1) = spans[a], spans[b]
        if any(not torch.equal(t[a], t[b]) for t in host.values()) or i1 - i0 != j1 - j0:
            return False
        if grids is None:
            return True
        return torch.equal(grids[i0:i1], grids[j0:j1]) and torch.equal(batch["pixel_values"][p0:p1],
                                                                       batch["pixel_values"][q0:q1])

    first: list[int] = []
    inverse: list[int] = []
    for row in range(rows):
        match = next((slot for slot, kept in enumerate(first) if same(kept, row)), None)
        if match is None:
            first.append(row)
            match = len(first) - 1
        inverse.append(match)
    if len(first) == rows:
        return None
    device = batch["input_ids"].device
    return torch.tensor(first, device=device), torch.tensor(inverse, device=device)


def rows_of(batch: dict, first, spans) -> dict:
    """The sub-batch of the rows ``first`` (their images with them)."""
    import torch

    out = {key: batch[key].index_select(0, first) for key in ROW_KEYS if batch.get(key) is not None}
    if batch.get("pixel_values") is not None:
        kept = [spans[row] for row in first.tolist()]
        out["image_grid_thw"] = torch.cat([batch["image_grid_thw"][i0:i1] for i0, i1, _, _ in kept])
        out["pixel_values"] = torch.cat([batch["pixel_values"][p0:p1] for _, _, p0, p1 in kept])
    return out


def prefill_once_per_prompt(model, batch: dict, positions, cache, vision_start_id: int | None):
    """The last position's logits of every row (B, V), each distinct prompt's forward run once and its keys and
    values copied into every row of ``cache`` (a StaticCache for all B rows); None when no prompt repeats (the
    caller prefills the batch as it is)."""
    from transformers import StaticCache

    if any(type(layer).__name__ != "StaticLayer" for layer in cache.layers):
        return None  # a sliding-window or other layer keeps its cache otherwise: prefilled whole
    spans = image_spans(batch, vision_start_id)
    found = repeated_rows(batch, spans)
    if found is None:
        return None
    first, inverse = found
    prompt = batch["input_ids"].shape[1]
    small = StaticCache(config=model.config, max_cache_len=prompt)
    out = model(**rows_of(batch, first, spans),
                position_ids=positions.index_select(-2, first), past_key_values=small, use_cache=True,
                logits_to_keep=1)
    for mine, theirs in zip(cache.layers, small.layers):
        if not mine.is_initialized:  # shaped as its own prefill would have made it, for all B rows
            mine.lazy_initialization(theirs.keys[:, :, :0].index_select(0, inverse),
                                     theirs.values[:, :, :0].index_select(0, inverse))
        mine.keys[:, :, :prompt].copy_(theirs.keys.index_select(0, inverse))
        mine.values[:, :, :prompt].copy_(theirs.values.index_select(0, inverse))
        mine.cumulative_length.fill_(prompt)
    return out.logits[:, -1].index_select(0, inverse)
