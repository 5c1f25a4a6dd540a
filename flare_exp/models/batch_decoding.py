"""Batches of records decoded with infer's settings: prompts batched and left-padded, the next batch's input built
ahead (InputsAhead; its files read by image_reading.py), generate() or the graph decode loop, a batch out of GPU
memory decoded in halves."""
from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING

from flare_exp.models.decoding import DecodeSettings, decoder_for
from flare_exp.profile_gaps import region

if TYPE_CHECKING:  # the chat is passed in; models/ does not import data/
    from flare_exp.data.vision import VisionChat

log = logging.getLogger(__name__)


def generate(model, chat: VisionChat, records: list[dict], inf, images=None, cache: str | None = None,
             compile_decode: bool = True, batch: dict | None = None) -> list[str]:
    import torch

    batch = batch if batch is not None else model_batch(model, chat, records, images)
    kwargs = generation_kwargs(inf, chat.tokenizer.pad_token_id)
    if cache:
        kwargs["cache_implementation"] = cache
        kwargs["disable_compile"] = not compile_decode
    with torch.inference_mode():
        out = model.generate(**batch, **kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1]:]  # left padding: the prompt ends at the same column
    return decode_new_tokens(chat.tokenizer, new_tokens)


def model_batch(model, chat: VisionChat, records: list[dict], images) -> dict:
    """The records' prompts, left-padded, on the model's device."""
    return model_batch_on(model.device, chat, records, images)


def model_batch_on(device, chat: VisionChat, records: list[dict], images, non_blocking: bool = False) -> dict:
    batch = chat.generation_batch(records, images)
    return {k: v.to(device, non_blocking=non_blocking) if hasattr(v, "to") else v for k, v in batch.items()}


def generation_kwargs(inf, pad_token_id: int) -> dict:
    """What infer asks of the model's generation config (both decode loops resolve it as generate does)."""
    kwargs = dict(max_new_tokens=inf.max_new_tokens, do_sample=inf.do_sample, pad_token_id=pad_token_id)
    if getattr(inf, "min_new_tokens", None):
        kwargs["min_new_tokens"] = inf.min_new_tokens
    if inf.do_sample:
        kwargs.update(temperature=inf.temperature, top_p=inf.top_p)
    return kwargs


def decode_new_tokens(tokenizer, new_tokens) -> list[str]:
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def max_positions(config) -> tuple[int, str] | None:
    """The model's context, prompt and new tokens together: (max_position_embeddings, its config.json key), from
    text_config where the config has one (Qwen3-VL), else the top level; None for a config without it."""
    def field(part, name):  # a loaded config, or its config.json read as a dict (the checks before any work)
        return part.get(name) if isinstance(part, dict) else getattr(part, name, None)

    for key, part in (("text_config.", field(config, "text_config")), ("", config)):
        value = field(part, "max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"{key}max_position_embeddings"
    return None


def check_room(config, prompt_tokens: int, max_new_tokens: int, key: str = "infer.max_new_tokens") -> None:
    """Refuse ``max_new_tokens`` that, after ``prompt_tokens`` (0: before any prompt is built), run past the
    model's context: generate() would go on past it (a model that never ends runs without end), and a static
    KV cache of that length would not fit."""
    found = max_positions(config)
    if found is None or prompt_tokens + max_new_tokens <= found[0] and max_new_tokens < found[0]:
        return
    limit, where = found
    said = f"{key}={max_new_tokens} does not fit the model's context: {limit} positions ({where} in its config.json)"
    if prompt_tokens >= limit:
        raise ValueError(f"{said}: the longest prompt of this batch alone takes {prompt_tokens} tokens; lower "
                         "model.max_pixels (fewer image tokens)")
    if prompt_tokens:
        raise ValueError(f"{said}, which the longest prompt of this batch ({prompt_tokens} tokens) and the new "
                         f"tokens share; pass {key}={max(limit - prompt_tokens, 0)} or less")
    raise ValueError(f"{said}, which the prompt and the new tokens share; pass a smaller {key}: at most {limit} less "
                     "the prompt's tokens")


def decode_settings(inf, backend: str) -> DecodeSettings:
    """infer's decoding, as infer.decode_loop / infer.cache_implementation / infer.keep_long_cache say."""
    return DecodeSettings.of("infer", inf, backend, shrink_cache=not inf.keep_long_cache)


class Decoder:
    """Batches of records decoded as ``decoder_for`` decides for infer's settings: generate(), or the graph
    decode loop, with the run's KV cache."""

    def __init__(self, model, chat: VisionChat, inf, backend: str, tokens_key: str = "infer.max_new_tokens"):
        """``tokens_key``: the setting that gave ``inf.max_new_tokens`` (an in-training eval's own), for errors."""
        self.model, self.chat, self.inf, self.tokens_key = model, chat, inf, tokens_key
        check_room(getattr(model, "config", None), 0, inf.max_new_tokens, tokens_key)  # before a cache that long
        self.decoding = decoder_for(model, decode_settings(inf, backend))
        self.halving_said = False  # decode_in_parts warns once per run
        self.ahead: InputsAhead | None = None  # the reader thread's prebuilt inputs (batches_with_images)
        if self.decoding.graph is not None:  # said at the start: the loop, or why generate runs instead
            self.decoding.graph.for_config(model, self._generation_config())

    def _generation_config(self):
        """infer's settings over the model's generation config, resolved as generate() resolves them (per
        batch: the config may change between batches)."""
        return self.model._prepare_generation_config(
            None, **generation_kwargs(self.inf, self.chat.tokenizer.pad_token_id))[0]

    def __call__(self, records: list[dict], images) -> list[str]:
        full = len(records) == self.inf.batch_size
        if self.decoding.takes_loop and full:
            return self._loop_decode(records, images)
        # A smaller last batch would need a new static cache and a new compilation: decode it eagerly.
        return self._generate(records, images, self.decoding.cache if full else None)

    def _input(self, records: list[dict], images) -> dict:
        """The batch's model input, built ahead by the reader thread or else now, its prompts (left-padded to the
        longest) and infer.max_new_tokens within the model's context: the longest prompts come first
        (infer.sort_by_length), so a run that does not fit stops at its first batch."""
        batch, _ = self._input_and_positions(records, images)
        return batch

    def _input_and_positions(self, records: list[dict], images) -> tuple[dict, object]:
        """``_input``'s batch, and the graph loop's prompt positions where the reader thread computed them
        (else None: the loop computes them)."""
        with region("batch input"):
            built = self.ahead.take(records) if self.ahead is not None else None
            batch, positions = built if built is not None else (
                model_batch(self.model, self.chat, records, images), None)
        check_room(getattr(self.model, "config", None), batch["input_ids"].shape[1], self.inf.max_new_tokens,
                   self.tokens_key)
        return batch, positions

    def _generate(self, records: list[dict], images, cache: str | None, batch: dict | None = None) -> list[str]:
        decoding = self.decoding  # compiled is read at each call: a failed compilation turns it off
        batch = batch if batch is not None else self._input(records, images)
        return decoding.attempt_compiled(lambda: generate(self.model, self.chat, records, self.inf, images, cache,
                                                          decoding.compiled, batch), "the decode step")

    def release_memory(self) -> None:
        """Drop the kept KV caches (the loop's, and generate's static one) and return the GPU's free blocks."""
        import gc

        import torch

        self.decoding.release_cache()
        if hasattr(self.model, "_cache"):
            del self.model._cache  # generate keeps its last static cache here and makes a new one when needed
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _loop_decode(self, records: list[dict], images) -> list[str]:
        config = self._generation_config()
        batch, positions = self._input_and_positions(records, images)
        new_tokens = self.decoding.new_tokens(batch, config.max_new_tokens, config.pad_token_id, config,
                                              "the decode loop's step", positions)
        if new_tokens is None:  # this batch's config asks for what the loop does not do
            return self._generate(records, images, self.decoding.cache, batch)
        with region("detokenize"):
            return decode_new_tokens(self.chat.tokenizer, new_tokens)


def decode_in_parts(decode: Decoder, records: list[dict], images) -> list[str]:
    """``decode(records, images)``; a batch that runs out of GPU memory is decoded in halves (down to single
    reports), said once. Prompts are sorted longest first, so the largest images meet infer.batch_size in the
    first batches; the halves decode with a dynamic cache, like a short last batch."""
    import torch

    try:
        return decode(records, images)
    except torch.OutOfMemoryError as e:
        if len(records) == 1:
            raise RuntimeError(
                f"{records[0]['id']}: one report ({decode.chat.sequence_length(records[0], with_answer=False)} "
                f"prompt tokens + infer.max_new_tokens={decode.inf.max_new_tokens}) does not fit in GPU memory: "
                "lower model.max_pixels (fewer image tokens) or infer.max_new_tokens") from e
        reason = str(e).splitlines()[0][:160]
    decode.release_memory()  # outside the except block: its traceback no longer holds the batch's tensors
    stopped_ahead = decode.ahead is not None and decode.ahead.stop()
    if not decode.halving_said or stopped_ahead:
        log.warning("infer: a batch of %d ran out of GPU memory (%s); decoding such batches in halves%s. A lower "
                    "infer.batch_size avoids the retries.", len(records), reason,
                    ", and building each batch's input in turn from now on (infer.inputs_ahead)" if stopped_ahead
                    else "")
        decode.halving_said = True
    half = len(records) // 2
    return (decode_in_parts(decode, records[:half], images[:half])
            + decode_in_parts(decode, records[half:], images[half:]))



def image_device(setting: str, model) -> str | None:
    """Where the images are processed: the model's device (auto), or the one named (checked here)."""
    if setting == "auto":
        return None if model.device.type == "cpu" else str(model.device)
    check_image_device(setting, here=True)
    return setting


def check_image_device(setting: str, here: bool) -> None:
    """infer.image_device's spelling; ``here``: also that this process has the GPU it names (in the job's own
    process: a sweep launched from a login node without GPUs checks the spelling only)."""
    if setting == "auto":
        return
    if setting != "cpu" and not re.fullmatch(r"cuda(:\d+)?", str(setting)):
        raise ValueError(f"infer.image_device={setting!r}: choose auto, cpu or cuda[:N]")
    if here and setting != "cpu":
        import torch

        cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(setting.partition(":")[2] or 0) >= cards:
            raise ValueError(f"infer.image_device={setting}: this process sees "
                             + (f"{cards} GPU(s) (cuda:0 to cuda:{cards - 1})" if cards else "no GPU")
                             + ": pass auto (the model's device) or cpu")


class InputsAhead:
    """The next batch's model input (the processor's resize and patching on the GPU, the ids uploaded) built in
    the reader thread on a second CUDA stream while the current batch decodes, so the decode thread finds it
    ready. The thread has its own copy of the processor: a tokenizer is not shared between threads.
    ``positions``: the graph loop's prompt positions for a built batch, computed there too (Qwen3-VL's rope index
    reads tensors back to the host per row: ~0.2 s of an idle GPU per batch of 128 in the decode thread)."""

    def __init__(self, model, chat: VisionChat, positions=None):
        import copy

        import torch

        from flare_exp.data.vision import VisionChat as Chat

        self.device = model.device
        self.chat = Chat(copy.deepcopy(chat.processor), chat.image_root, chat.image_device)
        # on a CPU (tests) the build runs in the thread without a stream, the order being the thread's own
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.positions = positions
        self.ready: dict[tuple, tuple] = {}
        self.stopped = False  # by a batch out of memory: the memory an input ahead holds goes to the decode

    def stop(self) -> bool:
        """No more inputs built ahead, those built dropped; True the first time (it was building until then)."""
        was_on, self.stopped = not self.stopped, True
        self.ready.clear()
        return was_on

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:  # a stopped loop leaves no built input behind (up to GiBs on a GPU)
        self.ready.clear()

    def state(self) -> str:
        """What the run's summary records."""
        return "ahead, then in turn (a batch ran out of GPU memory)" if self.stopped else "ahead"

    @staticmethod
    def key(records: list[dict]) -> tuple:
        return tuple(r["id"] for r in records)

    def build(self, records: list[dict], images) -> None:
        """Builds and keeps the records' input; out of GPU memory, it keeps none (the decoder builds it in turn,
        where a batch out of memory is decoded in halves)."""
        import torch

        if self.stopped:
            return
        try:
            self._build(records, images)
        except torch.OutOfMemoryError:
            pass

    def _build(self, records: list[dict], images) -> None:
        import torch

        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            batch = model_batch_on(self.device, self.chat, records, images, non_blocking=self.stream is not None)
            positions = self.positions(batch) if self.positions is not None else None
            built = torch.cuda.Event() if self.stream is not None else None
            if built is not None:
                built.record(self.stream)
        self.ready[self.key(records)] = (batch, positions, built)

    def take(self, records: list[dict]) -> tuple[dict, object] | None:
        """The batch built for exactly these records and its prompt positions (None where not computed), usable
        on the current stream; None for a half of a built batch."""
        import torch

        found = self.ready.pop(self.key(records), None)
        if found is None:
            return None
        batch, positions, built = found
        if built is None:
            return batch, positions
        current = torch.cuda.current_stream(self.device)
        current.wait_event(built)
        for v in [*batch.values(), positions]:
            if isinstance(v, torch.Tensor) and v.is_cuda:
                v.record_stream(current)  # freed later, its memory waits for this stream's use
        return batch, positions


def check_inputs_ahead(value) -> None:
    if value != "auto" and not isinstance(value, bool):  # 0, 1 and 1.0 too: a switch is true or false
        raise ValueError(f"infer.inputs_ahead={value!r}: choose auto, true or false")


def inputs_ahead(decode: Decoder) -> InputsAhead | None:
    """An InputsAhead for a decoder whose model and image processor are on a GPU, as infer.inputs_ahead says
    (auto: where the card holds it, card.infer_ahead_room), else None."""
    from flare_exp.card import card_memory, infer_ahead_room

    model, chat, inf = decode.model, decode.chat, decode.inf
    if not inf.inputs_ahead:
        return None
    if model.device.type != "cuda" or not str(chat.image_device).startswith("cuda"):
        if inf.inputs_ahead is True:
            log.info("infer.inputs_ahead=true: each batch's input is built in turn, as the model and "
                     "infer.image_device are not both on a GPU")
        return None
    if inf.inputs_ahead == "auto":
        fits, why = infer_ahead_room(card_memory(), inf.batch_size, inf.max_new_tokens)
        log.info("infer.inputs_ahead=auto: %s (%s)", "the next batch's input is built ahead" if fits else
                 "each batch's input is built in turn", why)
        if not fits:
            return None
    decode.ahead = InputsAhead(model, chat, loop_positions(decode.decoding.loop))
    return decode.ahead


def loop_positions(loop):
    """The graph loop's prompt positions of a batch, as a function the reader thread calls (None: no loop)."""
    if loop is None:
        return None
    from flare_exp.models.graph_decoding import prompt_positions

    return lambda batch: prompt_positions(loop.rope_owner, batch)
