"""prepare's image pass (decode by the stages' rule, EXIF, processor limits, digests) on mixed X-ray files, CPU.

    python -m bench.prepare_images --n 4000 --workers 2 --out /tmp/prep_bench

Writes n 512-px images, a quarter each: 8-bit greyscale PNG, 16-bit greyscale PNG (12-bit values), RGBA PNG,
EXIF-rotated JPEG (orientation 6), with X-ray-like content (smooth anatomy + noise, so files compress as real
ones do), then times ``check_images`` as prepare calls it and prints images/s.
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/flare_exp_prepare_bench"))
    args = parser.parse_args(argv)
    from flare_exp.data.images import QWEN3_VL_LIMITS, ProcessorLimits, check_images

    paths = make_images(args.out, args.n)
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
