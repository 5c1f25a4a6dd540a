"""prepare's image pass (decode by the stages' rule, EXIF, processor limits, digests) on mixed X-ray files, CPU.

    python -m bench.prepare_images --n 4000 --workers 2 --out /tmp/prep_bench
    python -m bench.prepare_images --n 4000 --workers 2 --out /tmp/prep_bench --stage   # the whole prepare stage

Writes n 512-px images, a quarter each: 8-bit greyscale PNG, 16-bit greyscale PNG (12-bit values), RGBA PNG,
EXIF-rotated JPEG (orientation 6), with X-ray-like content (smooth anatomy + noise, so files compress as real
ones do), then times ``check_images`` as prepare calls it and prints images/s; ``--stage`` runs the prepare
stage itself on a FLARE-layout tree holding them (one chestdr question per image) and reports its images/s.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KINDS = ("L8.png", "I16.png", "RGBA.png", "exif.jpg")


def make_images(folder: Path, n: int, side: int = 512, seed: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    paths = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        path = folder / f"{i:05d}-{kind}"
        paths.append(path)
        if path.exists():
            continue
        body = np.exp(-((x - 0.5) ** 2 / 0.08 + (y - 0.5 - 0.1 * rng.random()) ** 2 / 0.15))
        values = np.clip(body + 0.05 * rng.standard_normal((side, side)), 0, 1)
        grey = (values * 255).astype(np.uint8)
        if kind == "I16.png":
            Image.fromarray((values * 4095).astype(np.uint16)).save(path)
        elif kind == "RGBA.png":
            alpha = np.where(values > 0.05, 255, 0).astype(np.uint8)
            Image.fromarray(np.dstack([grey, grey, grey, alpha]), mode="RGBA").save(path)
        elif kind == "exif.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(grey).convert("RGB").transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
        else:
            Image.fromarray(grey).save(path)
    return paths


def run_stage(paths: list[Path], work: Path, workers: int) -> None:
    """The prepare stage on a FLARE-layout tree whose chestdr questions name the images."""
    import json
    import shutil

    from bench.common import compose
    from flare_exp.main import run

    dataset = work / "raw" / "training" / "Xray" / "chestdr"
    shutil.rmtree(work / "raw", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    dataset.mkdir(parents=True)
    (dataset / "imagesTr").symlink_to(paths[0].parent)
    questions = [{"TaskType": "Multi-label Classification", "Modality": "Xray", "ImageName": f"imagesTr/{p.name}",
                  "Question": "Which findings?", "Answer": "Effusion"} for p in paths]
    (dataset / "chestdr_questions_train.json").write_text(json.dumps(questions))
    summary = run(compose(["stage=prepare", "~experiment", "data=flare_xray", "model=tiny", "data.datasets=[chestdr]",
                           f"data.root={work / 'raw'}", f"data.image_workers={workers}",
                           f"paths.output_root={work / 'out'}", f"paths.cache_dir={work / 'cache'}"]),
                  run_dir=work / "out" / "run")
    seconds = json.loads((work / "out" / "prepared" / "flare_xray" / "summary.json").read_text())["seconds"]
    print(f"prepare stage: {len(paths)} images, {workers} workers: {seconds:.1f} s, {len(paths) / seconds:.0f} "
          f"images/s, records {summary['records']}, rejects {summary['rejects'] or 'none'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/flare_exp_prepare_bench"))
    parser.add_argument("--stage", action="store_true", help="run the whole prepare stage on them")
    args = parser.parse_args(argv)
    paths = make_images(args.out / "images", args.n)
    if args.stage:
        return run_stage(paths, args.out, args.workers)
    from flare_exp.data.images import QWEN3_VL_LIMITS, ProcessorLimits, check_images

    limits = ProcessorLimits(**QWEN3_VL_LIMITS, source="bench")
    start = time.perf_counter()
    limits.problem(512, 512)  # imports transformers' resize: once per prepare, timed apart
    print(f"transformers' smart_resize imported in {time.perf_counter() - start:.1f} s (once per prepare)")
    start = time.perf_counter()
    checked = check_images(paths, args.workers, limits=limits)
    seconds = time.perf_counter() - start
    problems = sum(bool(c.problem) for c in checked.values())
    print(f"{len(paths)} images ({', '.join(KINDS)}), {args.workers} workers: {seconds:.1f} s, "
          f"{len(paths) / seconds:.0f} images/s, {problems} rejected")


if __name__ == "__main__":
    main()
