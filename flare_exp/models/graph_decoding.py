"""Decoding of a left-padded batch with one compiled step per token: the graph decode loop that
``flare_exp.models.decoding`` chooses for infer, GRPO's rollouts and the GREEN judge (stages call that module).

transformers' ``generate`` with a static cache compiles the model's forward into CUDA graphs, but everything
around it runs on the host every token: the 4-D mask is rebuilt with vmap, the logits processors and stopping
criteria run eagerly, and the loop reads tensors back from the GPU several times per token
(``cache_position[0] != 0``, ``cache_position[-1] >= ...``, "are all sequences done?"). Each read waits for the
GPU to finish, so the GPU then idles while the host prepares the next token (the profiles are in
docs/performance.md).

Here one function makes a token: the model's forward with a mask built on the device from the prompt's padding
and the position, positions continuing each row's prompt positions (as generate's), the pick (greedy, or
sampled with generate's temperature / top-k / top-p rules), and the finished flags (a finished row gets the pad
token, as ``generate`` does). It is compiled as a whole (CUDA graphs on a GPU), and the host asks "all finished?" only every
``stop_check_every`` tokens, so it can queue tokens ahead of the GPU. The prefill is the model's own forward
(eager, as in ``generate``). Same tokens as ``generate`` (tested with padding, both decode attentions, early
stops): the extra tokens after the last row finished are pad tokens.

Only when the model's generation config asks for no other logits processing (a repetition penalty, banned
words, min-p, ... would change the picks): ``unsupported_settings`` names what stands in the way and the caller
falls back to ``generate``. Sampled tokens follow generate's distribution, not its random stream.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from flare_exp.models.rope_positions import rope_index, rope_owner
from flare_exp.profile_gaps import region

# how the token step is compiled on a GPU: CUDA graphs (as generate compiles its decode step), fixed shapes
COMPILE_ON_GPU = {"mode": "reduce-overhead", "dynamic": False}
# generation-config fields that make greedy decoding differ from argmax over the logits, with the values
# under which they do nothing
NO_OP_SETTINGS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_length": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "begin_suppress_tokens": (None, []),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
    "stop_strings": (None,), "num_beams": (None, 1), "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
}
# and when sampling, the warpers beyond temperature / top-k / top-p
SAMPLING_NO_OP_SETTINGS = {"min_p": (None, 0.0), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
                           "eta_cutoff": (None, 0.0)}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0


def unsupported_settings(generation_config) -> list[str]:
    """What keeps this loop from giving generate()'s tokens for this (resolved) config; empty when it can run."""
    reasons = []
    sampling = SAMPLING_NO_OP_SETTINGS if generation_config.do_sample else {}
    for name, no_op in {**NO_OP_SETTINGS, **sampling}.items():
        value = getattr(generation_config, name, None)
        if value not in no_op:
            reasons.append(f"generation_config.{name}={value!r}")
    return reasons


def end_token_ids(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("the model's generation_config has no eos_token_id: the decode loop could not stop")
    return ids


def sampling_scores(scores, sampling: Sampling):
    """generate's warpers, in its order: temperature, top-k, top-p (the most likely token always kept); the
    tokens they remove get -inf."""
    import torch

    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def sampling_of(generation_config) -> Sampling | None:
    """generate's sampling settings (None: greedy)."""
    if not generation_config.do_sample:
        return None
    return Sampling(temperature=generation_config.temperature if generation_config.temperature is not None
                    else 1.0, top_k=generation_config.top_k or None,
                    top_p=generation_config.top_p if generation_config.top_p is not None else 1.0)


def token_flags(ids, vocab: int, device):
    import torch

    flags = torch.zeros(vocab, dtype=torch.bool, device=device)
    flags[torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return flags


def pick(scores, is_end, may_end, suppressed, sampling: Sampling | None = None):
    """The next token, as generate's processors then warpers choose it: suppressed tokens (flags over the
    vocabulary) are out, end tokens too while may_end is False (min_new_tokens); then the greedy choice, or a
    draw from the warped distribution (the exponential race: the argmax of p / Exp(1) is a draw from p,
    without a host-side multinomial)."""
    import torch

    scores = scores.float().masked_fill(suppressed | (is_end & ~may_end), float("-inf"))
    if sampling is None:
        return scores.argmax(-1)
    probs = sampling_scores(scores, sampling).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def prompt_positions(owner, batch: dict):
    """generate's position ids for a left-padded prompt: each row's tokens counted from its first real one
    (B, L); for Qwen-VL models that row stacked over the three multimodal rope axes from the model's
    ``get_rope_index`` (4, B, L), as Qwen-VL's generate builds them. ``owner``: the module with
    ``get_rope_index`` (``rope_owner``), None for a text-only model."""
    import torch

    mask = batch["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if owner is None:
        return text
    if batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None:
        rope = text.unsqueeze(0).expand(3, -1, -1)
    else:
        rope = rope_index(owner.get_rope_index, batch)
    return torch.cat([text.unsqueeze(0), rope.to(text.device)], dim=0)


# the fewest common tokens worth reading apart (one key block of the split-KV kernel)
MIN_SHARED_TOKENS = 64


def common_beginning(batch: dict, minimum: int = MIN_SHARED_TOKENS):
    """(starts (B,), span (2,)) as ``split_kv_attention.attend`` takes them, int32: where each row's prompt
    begins after its left padding, and (row 0, the length of the beginning every row's prompt shares), or None
    where the rows share fewer than ``minimum`` tokens, the padding is not on the left, or the batch carries
    images or other inputs (equal token ids there need not be equal inputs). Equal tokens at equal positions
    after equal tokens: a causal model gives them equal keys and values (to rounding: each row's prefill
    computed its own)."""
    import torch

    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    if ids.shape[0] < 2 or set(batch) - {"input_ids", "attention_mask"}:
        return None
    length = ids.shape[1]
    starts = length - mask.sum(-1)
    columns = torch.arange(length, device=ids.device)
    if not torch.equal(mask, columns >= starts[:, None]):
        return None
    shortest = int((length - starts).min())
    if shortest < minimum:
        return None
    aligned = ids.gather(1, starts[:, None] + columns[:shortest])
    differs = (aligned != aligned[:1]).any(0)
    shared = int(differs.int().argmax()) if bool(differs.any()) else shortest
    if shared < minimum:
        return None
    return starts.to(torch.int32), torch.tensor([0, shared], dtype=torch.int32, device=ids.device)


# the forward hooks transformers' enable_input_require_grads and PEFT register on the input embeddings
INPUT_GRAD_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def input_grad_hooks_off(model):
    """The input embeddings' require-grad hooks (gradient checkpointing of a PEFT model: set by the model's
    loading and again by TRL) taken off while the loop decodes, put back after in their order: their
    ``requires_grad_`` call breaks the compiled step's graph on torch 2.11 (the rollout step then ran as ~5
    graphs with ~14 guard checks per token), and a decode needs no input gradients."""
    removed = []
    for module in model.modules():
        hooks = module._forward_hooks  # torch's own registry: the handles are the model's, not ours
        found = [key for key, hook in hooks.items() if getattr(hook, "__name__", "") in INPUT_GRAD_HOOKS]
        if found:
            removed.append((module, dict(hooks)))
            for key in found:
                del hooks[key]
    try:
        yield
    finally:
        for module, before in removed:
            hooks = module._forward_hooks
            added = {key: hook for key, hook in hooks.items() if key not in before}  # registered meanwhile
            hooks.clear()
            hooks.update(before)
            hooks.update(added)


class GraphDecoder:
    """Holds a static KV cache across batches and the compiled token step. The cache is kept while the batch
    size matches and it is long enough, and with ``shrink_cache`` at most twice as long as needed: each token
    attends over the whole cache, so the cache of a batch of large images (infer sorts prompts longest first)
    would make every later short batch pay for its length (``generate`` keeps any cache that is long enough);
    a new length costs a new compiled graph, and halving bounds their number when lengths only decrease.
    ``compile_step``: None = plain Python (CPU, debugging); else torch.compile keyword
    arguments. ``sampling``: None = greedy. ``cache_multiple``: the cache length is rounded up to a multiple of
    it, so prompts of varying length (GRPO) share a few caches and compiled graphs. ``shared_prefix``: where
    the model decodes with the split-KV kernel and a batch's prompts begin alike (``common_beginning``: the
    GREEN judge's instructions), each step reads that beginning's keys once per block of rows, not per row."""

    def __init__(self, model, compile_step: dict | None, stop_check_every: int = 16,
                 sampling: Sampling | None = None, cache_multiple: int = 1, shrink_cache: bool = True,
                 shared_prefix: bool = False):
        import torch

        if stop_check_every < 1:
            raise ValueError(f"stop_check_every={stop_check_every}: must be >= 1")
        self.model, self.stop_check_every, self.cache, self.sampling = model, stop_check_every, None, sampling
        self.cache_shape: tuple[int, int] | None = None  # (batch size, length) of self.cache
        self.rope_owner = rope_owner(model)
        self.cache_multiple, self.shrink_cache = cache_multiple, shrink_cache
        self.shared_prefix = shared_prefix
        self.cudagraphs = bool(compile_step) and compile_step.get("mode") in ("reduce-overhead",
                                                                                "max-autotune")
        self.step = torch.compile(self._token_step, **compile_step) if compile_step else self._token_step

    @property
    def split_kv(self) -> bool:
        """Whether the model's decode steps attend with the split-KV kernel (the only one that reads a shared
        beginning apart)."""
        from flare_exp.models.grouped_attention import SPLIT_KV_NAME

        return self.model.config.get_text_config()._attn_implementation == SPLIT_KV_NAME

    @property
    def cache_length(self) -> int | None:
        return None if self.cache_shape is None else self.cache_shape[1]

    def _token_step(self, tokens, cache_position, position_deltas, key_valid, finished, is_end, pad, may_end,
                    suppressed, shared=None):
        """One token for every row: tokens (B, 1), cache_position (1,), position_deltas (B, 1) or (4, B, 1)
        (see prompt_positions), key_valid (B, L) (prompt padding False), finished (B,), is_end / suppressed
        (vocabulary flags), may_end (1,): False before min_new_tokens. Returns (next tokens (B,), finished (B,)).
        The static cache writes at its own position, which is cache_position: one token per step from the
        prefill's end. shared: ``common_beginning``'s, for the split-KV kernel, or None."""
        import torch

        keys = torch.arange(key_valid.shape[1], device=key_valid.device)
        mask = (key_valid & (keys <= cache_position))[:, None, None, :]  # (B, 1, 1, L): what this token may see
        extra = {} if shared is None else {"shared_prefix": shared}  # reaches the attention functions
        logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=position_deltas + cache_position,
                            past_key_values=self.cache, use_cache=True, **extra).logits
        picked = pick(logits[:, -1], is_end, may_end, suppressed, self.sampling)
        picked = torch.where(finished, pad, picked)
        return picked, finished | is_end[picked]

    def release_cache(self) -> None:
        self.cache, self.cache_shape = None, None

    def _static_cache(self, batch_size: int, length: int):
        from transformers import StaticCache

        length = -(-length // self.cache_multiple) * self.cache_multiple
        kept = self.cache_shape
        fits = self.cache is not None and kept[0] == batch_size and length <= kept[1]
        if fits and (not self.shrink_cache or kept[1] <= 2 * length):
            self.cache.reset()
            return self.cache
        self.release_cache()  # freed before the next one is allocated
        self.cache = StaticCache(config=self.model.config, max_cache_len=length)
        self.cache_shape = (batch_size, length)
        return self.cache

    def generate(self, generation_config, **batch):
        """model.generate's answer (prompt and new tokens) for a generation config that
        ``unsupported_settings`` accepts, e.g. TRL's rollouts."""
        import torch

        if generation_config.max_new_tokens is None:
            raise ValueError("the graph decode loop needs generation_config.max_new_tokens")
        pad = generation_config.pad_token_id
        pad = end_token_ids(generation_config)[0] if pad is None else pad  # generate's choice too
        new = self(batch, generation_config.max_new_tokens, pad, generation_config)
        return torch.cat([batch["input_ids"], new], dim=1)

    def __call__(self, batch: dict, max_new_tokens: int, pad_token_id: int, generation_config=None,
                 row_limits=None, positions=None):
        """New tokens (B, T <= max_new_tokens) for a left-padded batch (the processor's output, on the model's
        device); rows that finished early are padded with pad_token_id. End tokens, min_new_tokens and
        suppressed tokens come from generation_config (default: the model's). ``row_limits``: each row's own
        cap on new tokens (B,), where it finishes as at an end token (the benchmark's answer-length mix).
        ``positions``: ``prompt_positions`` of the batch, where the caller computed them ahead."""
        import torch

        config = generation_config or self.model.generation_config
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        rows, prompt = input_ids.shape
        device = input_ids.device
        # the cache's tensors are inference tensors: reset them in this mode too
        with torch.inference_mode(), input_grad_hooks_off(self.model):
            cache = self._static_cache(rows, prompt + max_new_tokens)
            shared = common_beginning(batch) if self.shared_prefix and self.split_kv else None
            if positions is None:
                with region("rope positions"):
                    positions = prompt_positions(self.rope_owner, batch)
            # the prompt's forward (eager, as generate's) into the cache; each row's next-token logits (B, V)
            with region("prefill"):
                last = self.model(**batch, position_ids=positions, past_key_values=cache, use_cache=True,
                                  logits_to_keep=1).logits[:, -1]
            if self.rope_owner is not None:
                # generate's decoding state (unused here: every step passes its positions), left as a fresh
                # model has it: the compiled step is specialised on it, and a generate call in between set it
                self.rope_owner.rope_deltas = None
            # new token i (cache position prompt + i) of a row continues its prompt's last position
            position_deltas = positions[..., -1:] + 1 - prompt
            vocab = last.shape[-1]
            is_end = token_flags(end_token_ids(config), vocab, device)
            suppressed = token_flags(config.suppress_tokens or [], vocab, device)
            pad = torch.tensor(pad_token_id, device=device, dtype=input_ids.dtype)
            key_valid = torch.ones(rows, self.cache_length, dtype=torch.bool, device=device)
            key_valid[:, :prompt] = attention_mask.bool()
            tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
            may_end = torch.arange(max_new_tokens, device=device) >= (config.min_new_tokens or 0)  # per new token
            tokens[:, 0] = pick(last, is_end, may_end[:1], suppressed, self.sampling)
            limits = None if row_limits is None else torch.as_tensor(row_limits, device=device)
            finished = is_end[tokens[:, 0]] if limits is None else is_end[tokens[:, 0]] | (limits <= 1)
            cache_positions = torch.arange(prompt, prompt + max_new_tokens, device=device)  # no host copy per token
            made = 1
            with region("decode steps"):  # the profile's idle table gives the host's gaps here to this
                for made in range(1, max_new_tokens):
                    if (made - 1) % self.stop_check_every == 0 and bool(finished.all()):  # the host's only wait
                        break
                    if self.cudagraphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    picked, now_finished = self.step(tokens[:, made - 1:made], cache_positions[made - 1:made],
                                                     position_deltas, key_valid, finished, is_end, pad,
                                                     may_end[made:made + 1], suppressed, shared)
                    tokens[:, made] = picked  # copies out of the graph's output buffers before the next replay
                    # outside the compiled step: the step's graph is the same with and without row limits
                    finished = now_finished.clone() if limits is None else now_finished | (limits <= made + 1)
                else:
                    made = max_new_tokens
        return tokens[:, :made]
