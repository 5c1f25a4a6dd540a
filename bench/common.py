"""What the benchmark measurements share: config composition, the benchmark data (the demo generator at 512 px,
reshaped on request) and the model overrides for the Qwen3-VL-4B-shaped random model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    import flare_exp.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def bench_root(work: Path) -> Path:
    """The demo tree's root: under paths.cache_dir, the only place data=demo generates it."""
    return work / "cache" / "data" / "raw"


def bench_data(work: Path) -> list[str]:
    return [f"paths.cache_dir={work / 'cache'}", f"data.root={bench_root(work)}",
            f"data.prepared_dir={work / 'data' / 'prepared'}"]


def demo_data(image_size: int) -> list[str]:
    """The demo generator at 512 px: IU_XRay-like (two views + a short section answer) and one-view tasks."""
    return [f"data.demo.image_size={image_size}", "data.demo.train_per_dataset=64", "data.demo.val_per_dataset=16"]


def ensure_prepared(work: Path, image_size: int) -> None:
    from flare_exp.main import run

    if (work / "data" / "prepared" / "DONE").exists():
        return
    run(compose(["stage=prepare", *bench_data(work), *demo_data(image_size)]), run_dir=work / "runs" / "prepare")


REPORT_WORDS = ("the heart size is normal lungs are clear no pleural effusion or pneumothorax mediastinal contours "
                "unremarkable mild degenerative changes of the thoracic spine no focal consolidation").split()


def long_image(work: Path, side: int) -> str:
    """A side x side px X-ray-like image under data.root (path relative to it): the long case. Qwen3-VL spends
    one token per 32 x 32 px, so side=3424 is ~11.4k image tokens, near model.max_seq_length=12000."""
    import numpy as np
    from PIL import Image

    relative = f"bench_long/long_{side}.png"
    path = bench_root(work) / relative
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        base = np.random.default_rng(0).normal(120, 40, size=(side // 16, side // 16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(base, mode="L").resize((side, side), Image.BILINEAR).convert("RGB").save(path)
    return relative


def reshape_record(record: dict, views: int | None, answer_words: int | None, rng, image: str | None = None) -> dict:
    """The record with only its first `views` images, or one given `image` instead of its own, and/or a synthetic
    answer of `answer_words` words (one view + a ~250-token report: the bare-loop sample shape of docs/performance.md)."""
    record = json.loads(json.dumps(record))
    if image is not None:
        record["images"] = [image]
        user = record["messages"][0]["content"]
        record["messages"][0]["content"] = ([{"type": "image", "image": image}]
                                            + [c for c in user if c.get("type") != "image"])
    if views is not None:
        record["images"] = record["images"][:views]
        user = record["messages"][0]["content"]
        kept = [c for c in user if c.get("type") == "image"][:views]
        record["messages"][0]["content"] = kept + [c for c in user if c.get("type") != "image"]
    if answer_words is not None:
        record["answer"] = " ".join(rng.choice(REPORT_WORDS) for _ in range(answer_words)) + "."
        record["messages"][1]["content"] = [{"type": "text", "text": record["answer"]}]
    return record


def filtered_file(work: Path, dataset: str, repeat: int = 8, views: int | None = None,
                  answer_words: int | None = None, long_side: int | None = None) -> Path:
    import random

    from flare_exp.io import read_jsonl, write_jsonl

    shape = ("" if views is None else f"_v{views}") + ("" if answer_words is None else f"_a{answer_words}") + (
        "" if long_side is None else f"_l{long_side}")
    out = work / "data" / f"train_{dataset}_x{repeat}{shape}.jsonl"
    if not out.exists():
        rng = random.Random(0)
        image = long_image(work, long_side) if long_side else None
        rows = [reshape_record(r, views, answer_words, rng, image)
                for r in read_jsonl(work / "data" / "prepared" / "train.jsonl") if r["dataset"] == dataset]
        write_jsonl(out, [{**r, "id": f"{r['id']}#{k}"} for k in range(repeat) for r in rows])
    return out


def model_overrides(args) -> list[str]:
    """The model's overrides; each caller puts the --set ones last, so that they win over the bench's own."""
    return [f"model.path={args.model_dir}", f"model.backend={args.backend}", "model.build_tiny=false",
            f"model.dtype={args.dtype}", "model.min_pixels=3136",
            f"model.max_pixels={max(512, getattr(args, 'long_side', None) or 0) ** 2}",
            "model.max_seq_length=16384", "model.lora.modules_to_save=[]", "model.lora.r=16",
            "model.lora.alpha=16", f"model.gradient_checkpointing={args.grad_ckpt}",
            f"model.vision_encoder={args.vision_encoder}"]


LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "unsloth", "unsloth_zoo")


def library_versions() -> dict[str, str]:
    """The versions a measurement ran with: from the imported module where there is one (the lent GPU box has
    two transformers, the carried one first on the path), else from the installed metadata without importing
    (importing Unsloth would patch transformers for an hf measurement). Absent libraries are left out."""
    import sys
    from importlib import metadata

    versions = {}
    for name in LIBRARIES:
        module = sys.modules.get(name)
        try:
            versions[name] = getattr(module, "__version__", None) or metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def gpu_peak_gib() -> float | None:
    """torch's peak GPU memory since the last reset, GiB (None on a CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def gpu_held_gib() -> dict | None:
    """What the process still holds on the GPU after a collection, GiB (None on a CPU): a finished stage run
    should leave nothing behind for the next one in the same process (a pipeline's steps, the bench's warm-up)."""
    import gc

    import torch

    if not torch.cuda.is_available():
        return None
    gc.collect()
    torch.cuda.synchronize()
    return {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved": round(torch.cuda.memory_reserved() / 2**30, 2)}


# Dense (no sparsity) bf16 tensor-core peaks of the cards we know, TFLOP/s, from the vendors' datasheets; matched
# against torch's device name in this order (the first match wins: "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = ((r"H100 NVL|H200 NVL", 835.0), (r"H100 PCIe", 756.0), (r"H100|H200", 989.0), (r"A100", 312.0),
                    (r"L40S", 362.0), (r"\bL4\b", 121.0))


def peak_bf16_tflops(device: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in the table (a CPU included)."""
    import re

    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, device)), None)


def model_flops_utilization(n_params: int | None, tokens_per_second: float | None, device: str,
                            peak_tflops: float | None = None) -> dict:
    """MFU = 6 x N x tokens/s over the card's peak (``peak_tflops`` overrides the table). What is not known is
    said, never guessed: no parameter count, no throughput or an unknown card give ``mfu: None`` and a note."""
    peak = peak_tflops or peak_bf16_tflops(device)
    missing = [what for what, value in (("no parameter count", n_params), ("no tokens/s", tokens_per_second),
                                        (f"no bf16 peak known for {device!r} (pass --peak-tflops)", peak))
               if not value]
    if missing:
        return {"mfu": None, "mfu_peak_tflops": peak, "mfu_note": "unknown: " + "; ".join(missing)}
    return {"mfu": round(6 * n_params * tokens_per_second / (peak * 1e12), 4), "mfu_peak_tflops": peak}


def write_result(out_dir, name: str, result: dict, tag: str) -> None:
    """A measurement's result as <out_dir>/<name>.json, and on stdout after ``tag`` (the caller's log)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(tag, json.dumps(result))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def measurement_name(args) -> str:
    """One name per measured setting: its run directory, profile file and result JSON."""
    parts = [args.what, args.backend, f"bs{args.batch}"]
    if args.what == "grpo":
        parts += [f"ng{args.num_generations}", args.cache or "dynamic"] + (["compiled"] if args.compile else [])
    elif args.what == "infer":
        parts += [args.cache or "dynamic", f"img{args.image_device}"]
        parts += ([f"long{args.long_side}first"] if args.long_side else []) + (
            ["keepcache"] if args.keep_long_cache else []) + (["mixflare"] if args.length_mix == "flare" else [])
    elif args.what == "sft":
        parts += [f"w{'default' if args.workers is None else args.workers}"] + (["compiled"] if args.compile else [])
    if args.what == "reward":
        return f"reward-ng{args.num_generations}-n{args.samples}-radgraph{args.radgraph_size}"
    if args.what in ("sft", "loop") and args.grad_ckpt == "false":
        parts.append("nockpt")
    if args.vision_encoder != "batched":
        parts.append(f"vision-{args.vision_encoder}")
    if args.what in ("sft", "loop") and args.force_vision_encoder:
        parts.append("forced-vision")
    if args.what == "loop" and args.distinct_batches:
        parts.append("distinct")
    if args.card_gib:
        parts.append(f"cap{args.card_gib:g}")
    parts += [override.rsplit(".", 1)[-1].replace("=", "-") for override in args.set + args.env]
    if args.what in ("sft", "loop"):
        parts += [name for name, _ in sample_shape(args)]
    return "-".join(parts + [args.dataset])


def sample_shape(args) -> list[tuple[str, str]]:
    """How the samples were reshaped (sft/loop): (file-name part, words for the result's "samples")."""
    return (([(f"views{args.views}", f"{args.views} view(s)")] if args.views is not None else [])
            + ([(f"answer{args.answer_words}w", f"{args.answer_words}-word answers")]
               if args.answer_words is not None else [])
            + ([(f"long{args.long_side}px", f"one {args.long_side}-px image")] if args.long_side else []))


def cap_memory(gib: float) -> None:
    """The process capped at ``gib`` of the card (a smaller card emulated; FLARE_EXP_CARD_GIB tells the stages'
    sizing, since torch before 2.14 cannot say the cap)."""
    import os

    import torch

    from flare_exp.card import CARD_GIB_ENV

    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    if gib > total:
        raise SystemExit(f"--card-gib {gib}: the card has only {total:.0f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib / total, 0)
    os.environ[CARD_GIB_ENV] = f"{gib:g}"
