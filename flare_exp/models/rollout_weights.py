"""GRPO's rollouts on a merged copy of the policy (``rl.rollout_weights``), backend=hf.

PEFT keeps the LoRA weights in float32, so an unmerged policy runs two small float32 GEMMs per LoRA layer at
every decode token (~500 per token for Qwen3-VL-4B: 8.3 ms per token against 4.6 ms for the base model,
docs/performance.md). ``merged``: before each rollout every LoRA layer's W + scaling * (B @ A) is computed in
float32 and rounded once to W's dtype into a buffer of that layer, allocated at the first rollout and kept for
the run: the compiled decode step (CUDA graphs) reads the weights by address, so the addresses stay the same
from rollout to rollout. During the rollout the layer's base weight points at its buffer and the layer's
adapter is off; afterwards the original weight (never written) and the adapter are back, also on an error.
PEFT's merge()/unmerge() are not used: they add and subtract the product in the bf16 base weight itself,
which drifts a little further from the loaded weights at every step.

The rollout then samples from a bf16 rounding of W + sBA; TRL's loss recomputes the log-probs with the
adapter, so the gradient is the adapter's (docs/performance.md, "Waiting for a measurement").
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SETTINGS = ("adapter", "merged", "auto")
FLOAT_DTYPES = ("torch.float32", "torch.bfloat16", "torch.float16")


@dataclass
class MergedLayer:
    """A PEFT LoRA Linear, the adapters active on it, and its merged buffer (None until the first refresh)."""
    name: str
    layer: Any
    adapters: tuple[str, ...]
    buffer: Any = None

    @property
    def weight(self):
        return self.layer.get_base_layer().weight


def unsupported(layer, adapters: tuple[str, ...]) -> str | None:
    """Why a LoRA layer with active ``adapters`` cannot be merged here (None: it can). Only plain LoRA on a
    Linear (or a fan_in_fan_out Conv1D) with a float weight is handled: anything else would decode wrongly."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear):
        return f"a LoRA layer of type {type(layer).__name__} (only LoRA on Linear layers is merged)"
    if str(layer.get_base_layer().weight.dtype) not in FLOAT_DTYPES:
        return f"a base weight of dtype {layer.get_base_layer().weight.dtype} (quantized?)"
    for adapter in adapters:
        if adapter in getattr(layer, "lora_variant", {}):  # DoRA and PEFT's other variants
            return f"the LoRA variant {type(layer.lora_variant[adapter]).__name__} (e.g. use_dora)"
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            return "lora_bias=true"
    if layer.merged:
        return "adapters already merged into the base weights"
    return None


def lora_layers(policy) -> tuple[list[MergedLayer], str | None]:
    """The policy's LoRA layers with an active adapter, or (empty, why) when one of them cannot be merged."""
    from peft.tuners.lora.layer import LoraLayer

    found = []
    for name, module in policy.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue  # a layer whose adapter is off already decodes with its base weight
        adapters = tuple(a for a in module.active_adapters if a in module.lora_A)
        if not adapters:
            continue
        why = unsupported(module, adapters)
        if why:
            return [], f"{name}: {why}"
        found.append(MergedLayer(name, module, adapters))
    return found, None


def merge_into(entry: MergedLayer) -> None:
    """entry.buffer <- W + sum(scaling * B @ A), in float32, rounded once to W's dtype (in place: same address)."""
    layer = entry.layer
    delta = None
    for adapter in entry.adapters:
        product = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
        product.mul_(layer.scaling[adapter])
        delta = product if delta is None else delta.add_(product)
    if layer.fan_in_fan_out:  # the base weight is stored (in, out)
        delta = delta.T
    entry.buffer.copy_(delta.add_(entry.weight))


class MergedCopy:
    """The merged copy of one policy: ``swapped()`` around each rollout."""

    def __init__(self, layers: list[MergedLayer]):
        self.layers = layers

    @property
    def nbytes(self) -> int:
        return sum(e.weight.numel() * e.weight.element_size() for e in self.layers)

    def refresh(self) -> None:
        """The buffers hold the current LoRA weights (allocated once, on the weights' device, then overwritten)."""
        import torch

        with torch.no_grad():
            for entry in self.layers:
                if entry.buffer is None:
                    entry.buffer = torch.empty_like(entry.weight)
                merge_into(entry)

    @contextmanager
    def swapped(self):
        """Inside: each layer's base weight is its refreshed buffer, its adapter off. After: as before."""
        self.refresh()
        kept = []
        try:
            for entry in self.layers:
                kept.append((entry, entry.weight.data, entry.layer._disable_adapters))
                entry.weight.data = entry.buffer  # the same Parameter object, the buffer's storage
                entry.layer._disable_adapters = True  # the flag PEFT's forward reads; no requires_grad changes
            yield
        finally:
            for entry, original, flag in reversed(kept):
                entry.weight.data = original
                entry.layer._disable_adapters = flag


def auto_margin_bytes(rollout_rows: int, micro_batch: int, sequence_tokens: int, kept_share: float = 0.0) -> int:
    """What must stay free beside the copy, which is kept for the whole run: the rollout's KV cache and decode
    activations (infer's measured GiB per 1,000 tokens of a row), a recomputed training pass of the micro-batch
    (the rl card preset's coefficient) plus the ``kept_share`` of its activations the layers that do not
    recompute keep (rl.recompute_every_n_layers), and 2 GiB for the merge's float32 temporaries and
    fragmentation."""
    from flare_exp.card import MEMORY_MODEL as m

    per_1k = m["sft_recomputed_gib_per_1k_tokens"] + kept_share * m["rl_kept_gib_per_1k_tokens"]
    gib = (rollout_rows * sequence_tokens * m["infer_gib_per_1k_tokens"] / 1000
           + micro_batch * sequence_tokens * per_1k / 1000 + 2.0)
    return int(gib * 2**30)


def free_bytes(device) -> int:
    """Free on the card, counting what torch's allocator holds unused (it reuses that first)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_refusal(on_gpu: bool, graph_loop: bool, free: int, copy: int, margin: int) -> str | None:
    """Why auto keeps the adapter, None where it takes the merged copy: the graph loop's compiled rollouts on a
    GPU, where the float32 LoRA products were measured, and room for the copy beside the margin."""
    if not on_gpu:
        return "no GPU"
    if not graph_loop:
        return "the rollouts do not run the graph decode loop"
    if free < copy + margin:
        return f"{free / 2**30:.1f} GiB free < the copy + a margin of {margin / 2**30:.1f} GiB"
    return None


class RolloutWeights:
    """One run's ``rl.rollout_weights``, resolved at the first rollout (the policy is on its device then).
    ``graph_loop``: the rollouts run the graph decode loop; ``margin_bytes``: auto's free memory beside the copy."""

    def __init__(self, setting: str, backend: str, graph_loop: bool, margin_bytes: int = 0):
        self.setting, self.backend, self.graph_loop, self.margin = setting, backend, graph_loop, margin_bytes
        self.copy: MergedCopy | None = None
        self.used: str | None = None  # adapter | merged, once resolved

    def resolve(self, policy) -> str:
        if self.used is not None:
            return self.used
        self.used = "adapter"
        if self.setting == "adapter" or self.backend != "hf":
            return self.used  # unsloth: refused for merged at startup; auto stays on its own LoRA kernels
        layers, why = lora_layers(policy)
        if why:
            log.warning("rl.rollout_weights=%s: the rollouts keep the adapter, because of %s", self.setting, why)
            return self.used
        copy, on_gpu = MergedCopy(layers), policy.device.type == "cuda"
        size = f"{copy.nbytes / 2**30:.2f} GiB" if copy.nbytes >= 2**28 else f"{copy.nbytes / 2**20:.1f} MiB"
        if self.setting == "auto":
            why = auto_refusal(on_gpu, self.graph_loop, free_bytes(policy.device) if on_gpu else 0, copy.nbytes,
                               self.margin)
            if why:
                log.info("rl.rollout_weights=auto: adapter (%s; the merged copy would take %s)", why, size)
                return self.used
        self.copy, self.used = copy, "merged"
        log.info("rl.rollout_weights=%s: merged, a %s copy of %d LoRA layers' weights", self.setting, size,
                 len(layers))
        return self.used

    @contextmanager
    def around_rollout(self, policy):
        if self.resolve(policy) == "merged":
            with self.copy.swapped():
                yield
        else:
            yield
