"""Images as users bring them: every PIL mode decoded by one rule (high bit depth scaled, alpha composited,
EXIF orientation applied), the same pixels in prepare, sft, rl and infer; images the processor cannot take
rejected at prepare with the reason."""
import hashlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from flare_exp.data.decoding import decode_image
from flare_exp.data.images import ProcessorLimits, check_images
from flare_exp.data.vision import VisionChat
from flare_exp.io import read_jsonl
from test_prepare import GOOD, _prepare, _small_tree

GRADIENT = (1000 + np.arange(64 * 64)).reshape(64, 64)  # a 12-bit X-ray's range, stored in 16 bits


def _files(folder):
    """One file per mode PIL opens, named after it; what each must decode to is asserted below."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = (GRADIENT / 5096 * 255).astype(np.uint8)
    made = {
        "1": Image.fromarray(grey > 128).convert("1"), "L": Image.fromarray(grey),
        "LA": Image.merge("LA", [Image.fromarray(grey), Image.new("L", (64, 64), 0)]),
        "P": Image.fromarray(grey).convert("P"), "RGB": Image.fromarray(np.stack([grey] * 3, -1)),
        "RGBA": Image.fromarray(np.dstack([np.stack([grey] * 3, -1), np.full((64, 64), 128, np.uint8)])),
        "CMYK": Image.fromarray(grey).convert("CMYK"), "I;16": Image.fromarray(GRADIENT.astype(np.uint16)),
        "I": Image.fromarray(GRADIENT.astype(np.int32)), "F": Image.fromarray(GRADIENT.astype(np.float32)),
    }
    paths = {}
    for mode, im in made.items():
        suffix = ".tif" if mode in ("I", "F", "CMYK") else ".png"
        paths[mode] = folder / f"{mode.replace(';', '_')}{suffix}"
        im.save(paths[mode])
    tall = Image.fromarray(np.stack([grey[:, :32]] * 3, -1))  # 64 high, 32 wide, stored turned: EXIF 6
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view
    tall.transpose(Image.Transpose.ROTATE_90).save(folder / "exif.jpg", exif=exif, quality=95)
    paths["exif"] = folder / "exif.jpg"
    return paths


def test_every_mode_becomes_8_bit_rgb_by_the_rule(tmp_path):
    paths = _files(tmp_path)
    for mode, path in paths.items():
        with Image.open(path) as im:
            assert mode == "exif" or im.mode == mode, (mode, im.mode)
        assert decode_image(path).mode == "RGB"
    for mode in ("I;16", "I", "F"):  # scaled by their own range: the full 0..255, every grey level used
        pixels = np.asarray(decode_image(paths[mode]))[..., 0]
        assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 250, mode
        assert (np.asarray(decode_image(paths[mode])) == np.asarray(decode_image(paths["I;16"]))).all()
    windowed = np.asarray(decode_image(paths["I;16"], (0, 4095)))[..., 0]
    assert windowed.max() == 255 and windowed.min() == round(1000 * 255 / 4095)  # clipped above the window
    assert not np.asarray(decode_image(paths["LA"])).any()  # transparent: black, like RGBA over black
    rgba = np.asarray(decode_image(paths["RGBA"])).astype(int)
    assert np.abs(rgba - np.asarray(decode_image(paths["RGB"])).astype(int) // 2).max() <= 1
    assert set(np.unique(np.asarray(decode_image(paths["1"])))) == {0, 255}
    assert decode_image(paths["exif"]).size == (32, 64)  # turned upright (the file holds it 64 x 32)


def test_a_transparent_colour_declared_by_a_tRNS_chunk_is_ignored_in_every_mode(tmp_path):
    """One grey picture saved as L, RGB, P (one transparent index, or a palette's alphas) and GIF, each declaring
    its grey 40 transparent: every file decodes to the stored values (40 stays 40, not black as P's did), and
    prepare's pixel digest, by which it finds one picture under two names, is the same for all."""
    grey = np.full((32, 32), 40, np.uint8)
    grey[:, 16:] = 200
    palette = Image.fromarray(grey).convert("P")
    index = palette.getpixel((0, 0))
    files = {"L.png": (Image.fromarray(grey), 40), "RGB.png": (Image.fromarray(grey).convert("RGB"), (40, 40, 40)),
             "P.png": (palette, index), "P.gif": (palette, index),
             "P_alphas.png": (palette, bytes(128 if i == index else 255 for i in range(256)))}
    for name, (im, transparency) in files.items():
        im.save(tmp_path / name, transparency=transparency)
        with Image.open(tmp_path / name) as opened:
            assert "transparency" in opened.info, name  # the file declares it
    Image.fromarray(grey).save(tmp_path / "plain.png")
    expected = np.asarray(decode_image(tmp_path / "plain.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's advice to convert a palette's alphas to RGBA is not said
        for name in files:
            assert (np.asarray(decode_image(tmp_path / name)) == expected).all(), name
    checked = check_images([tmp_path / name for name in (*files, "plain.png")], workers=1)
    assert len({check.pixels for check in checked.values()}) == 1


def _png16(path, channels: np.ndarray, colour_type: int, exif: bytes = b""):
    """A 16-bit PNG written byte by byte (PIL writes no 16-bit colour PNG): channels (H, W, C)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = channels.astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", rows.shape[1], rows.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + (chunk(b"eXIf", exif) if exif else b"")
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_a_16_bit_colour_png_is_scaled_as_a_16_bit_grey_one_not_cut_to_its_high_byte(tmp_path):
    """PIL opens a 16-bit RGB or grey+alpha PNG as RGB / RGBA holding each value's high byte: 12-bit data
    became 16 levels of near black (0..14), whatever data.image_window said. Decoded in full, they give the
    16-bit grey PNG's pixels; prepare counts them as what they are."""
    grey = GRADIENT[..., None]
    opaque = np.full_like(grey, 65535)
    paths = {"I;16": tmp_path / "grey.png", "RGB;16": _png16(tmp_path / "rgb.png", np.concatenate([grey] * 3, -1), 2),
             "LA;16": _png16(tmp_path / "la.png", np.concatenate([grey, opaque], -1), 4),
             "RGBA;16": _png16(tmp_path / "rgba.png", np.concatenate([grey] * 3 + [opaque // 2], -1), 6)}
    Image.fromarray(GRADIENT.astype(np.uint16)).save(paths["I;16"])
    for window in (None, (0, 4095)):
        want = np.asarray(decode_image(paths["I;16"], window))
        for label in ("RGB;16", "LA;16"):
            assert np.array_equal(np.asarray(decode_image(paths[label], window)), want), (label, window)
        half = np.asarray(decode_image(paths["RGBA;16"], window)).astype(int)  # alpha 0.5: over black
        assert np.abs(half - want.astype(int) // 2).max() <= 1
    assert np.asarray(decode_image(paths["RGB;16"])).max() == 255
    checked = check_images(list(paths.values()), workers=1, window=None)
    assert {label: checked[path].mode for label, path in paths.items()} == {label: label for label in paths}
    assert checked[paths["RGB;16"]].pixels == checked[paths["I;16"]].pixels
    upright = np.concatenate([grey[:, :32]] * 3, -1)  # 64 high, 32 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter (rotate 90 clockwise to view), as a scanner export may be
    turned = _png16(tmp_path / "turned.png", np.rot90(upright), 2, exif.tobytes())
    assert np.array_equal(np.asarray(decode_image(turned)), np.asarray(decode_image(_png16(
        tmp_path / "upright.png", upright, 2))))


def test_a_blank_16_bit_colour_frame_is_named_as_a_16_bit_grey_one_is(tmp_path):
    """A blank detector frame's noise (1000 +- 3), stretched from its own range to full contrast: named as nearly
    uniform in a 16-bit grey file, and now in a 16-bit colour one too (its values were not looked at)."""
    from flare_exp.data.images import NEARLY_UNIFORM

    noise = (1000 + np.random.default_rng(0).normal(0, 3, (96, 96))).astype(np.uint16)
    Image.fromarray(noise).save(tmp_path / "grey.png")
    paths = [tmp_path / "grey.png", _png16(tmp_path / "rgb.png", np.stack([noise] * 3, -1), 2),
             _png16(tmp_path / "la.png", np.stack([noise, np.full_like(noise, 65535)], -1), 4)]
    checked = check_images(paths, workers=1, window=None)
    assert [checked[p].uniform >= NEARLY_UNIFORM for p in paths] == [True, True, True]
    narrow = (1000 + np.arange(96 * 96) % 8).reshape(96, 96).astype(np.uint16)  # 8 levels: no content either
    colour = _png16(tmp_path / "narrow.png", np.stack([narrow] * 3, -1), 2)
    assert check_images([colour], workers=1, window=None)[colour].uniform == 1.0


def _tiff16(path, channels: np.ndarray, packbits: bool = False):
    """A 16-bit colour TIFF (little-endian, one strip), written byte by byte: channels (H, W, C); uncompressed, or
    PackBits-compressed (literal runs of 128 bytes) as a compressed file no full reader here takes."""
    import struct

    height, width, count = channels.shape
    data = channels.astype("<u2").tobytes()
    if packbits:
        data = b"".join(bytes([len(data[i:i + 128]) - 1]) + data[i:i + 128] for i in range(0, len(data), 128))
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, count, 0), (259, 3, 1, 32773 if packbits else 1),
            (262, 3, 1, 2),
            (273, 4, 1, 0), (277, 3, 1, count), (278, 3, 1, height), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    bits_at = 8 + 2 + 12 * len(tags) + 4
    strip_at = bits_at + 2 * count
    ifd = struct.pack("<H", len(tags))
    for tag, kind, n, value in tags:
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        ifd += struct.pack("<HHIHH", tag, kind, n, value, 0) if kind == 3 and n == 1 else \
            struct.pack("<HHII", tag, kind, n, value)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) +
                     struct.pack(f"<{count}H", *[16] * count) + data)
    return path


def test_a_16_bit_colour_tiff_is_read_in_full_where_uncompressed_and_said_where_not(tmp_path):
    """A scanner's uncompressed 48-bit TIFF: PIL reads its high bytes; read in full, it gives the 16-bit grey
    pixels. A compressed one keeps PIL's reading and its label says so (summary.json's images_by_mode)."""
    from flare_exp.data.decoding import mode_label

    grey = Image.fromarray(GRADIENT.astype(np.uint16))
    grey.save(tmp_path / "grey.png")
    tiff = _tiff16(tmp_path / "rgb.tif", np.stack([GRADIENT] * 3, -1))
    for window in (None, (0, 4095)):
        assert np.array_equal(np.asarray(decode_image(tiff, window)),
                              np.asarray(decode_image(tmp_path / "grey.png", window)))
    with Image.open(tiff) as im:
        assert im.mode == "RGB" and mode_label(im) == "RGB;16"
        im.tile = [tile._replace(codec_name="tiff_lzw") for tile in im.tile]  # as a compressed file's
        assert mode_label(im) == "RGB;16 (high bytes only)"


def test_a_compressed_16_bit_colour_tiff_is_named_by_prepare_and_keeps_pils_reading(tmp_path, caplog):
    """A compressed (here PackBits) 48-bit TIFF has no full reader here: its pixels are PIL's high bytes, its label
    says so in summary.json, and prepare warns how to keep its full depth."""
    root = tmp_path / "raw"
    d = _small_tree(root, [{**GOOD, "ImageName": "imagesTr/packed.tif"}], images=())
    packed = _tiff16(d / "imagesTr" / "packed.tif", np.stack([GRADIENT] * 3, -1), packbits=True)
    with Image.open(packed) as im:
        pil_reading = np.asarray(im.convert("L"))
    assert np.array_equal(np.asarray(decode_image(packed))[..., 0], pil_reading)
    caplog.set_level("WARNING", logger="flare_exp.data.prepare")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    assert json.loads((out / "summary.json").read_text())["images_by_mode"] == {"RGB;16 (high bytes only)": 1}
    assert ("1 16-bit colour image(s) are compressed TIFFs read by their high bytes only" in caplog.text
            and "packed.tif: save them as 16-bit grey (PNG or TIFF) for their full depth" in caplog.text)


def test_prepare_sft_rl_and_infer_see_the_same_pixels(tmp_path):
    from flare_exp.models.image_reading import batches_with_images
    from flare_exp.stages.rl import grpo_dataset

    paths = _files(tmp_path / "raw")
    checked = check_images(list(paths.values()), workers=1, window=(0, 6000))
    chat = VisionChat(SimpleNamespace(tokenizer=None), tmp_path / "raw")  # load_images reads files only
    records = [{"id": mode, "images": [path.name], "image_window": [0, 6000], "task_type": "classification",
                "answer": "A", "dataset": "d", "messages": [{"role": "user", "content": "q"}]}
               for mode, path in paths.items()]
    _, infer_images = next(iter(batches_with_images(chat, records, len(records), threads=4)))
    rl_rows = grpo_dataset(records, chat)
    for i, (mode, path) in enumerate(paths.items()):
        digest = lambda im: hashlib.sha1(im.tobytes()).hexdigest()  # noqa: E731
        sft = chat.load_images(records[i])[0]  # the collator's (sft_batch -> _encode -> load_images)
        assert checked[path].pixels == digest(sft) == digest(infer_images[i][0]) == \
            digest(rl_rows[i]["images"][0]), mode
        assert checked[path].mode == (mode if mode != "exif" else "RGB")


def test_prepare_counts_modes_and_rejects_what_the_processor_cannot_take(tmp_path):
    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD] + [{**GOOD, "ImageName": f"imagesTr/{name}", "Question": f"q{i}"}
                                    for i, name in enumerate(["x16.png", "tiny.png", "strip.png", "rgba.png"])])
    Image.fromarray(GRADIENT.astype(np.uint16)).save(d / "imagesTr" / "x16.png")
    Image.new("L", (8, 8)).save(d / "imagesTr" / "tiny.png")  # smaller than one 16-px patch
    Image.new("L", (6400, 20)).save(d / "imagesTr" / "strip.png")  # aspect ratio 320 > the processor's 200
    Image.new("RGBA", (32, 32)).save(d / "imagesTr" / "rgba.png")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "data.image_window=[0,4095]")
    reasons = {r["index"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert sorted(reasons) == [2, 3]
    assert reasons[2].startswith("image smaller than one vision patch: 8x8 px, the processor's patch is 16 px")
    assert reasons[3].startswith("image the processor refuses: 6400x20 px: absolute aspect ratio")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_by_mode"] == {"I;16": 1, "RGB": 1, "RGBA": 1}
    assert summary["rejects"] == {"image smaller than one vision patch": 1, "image the processor refuses": 1}
    assert {r["image_name"]: r["image_window"] for r in read_jsonl(out / "train.jsonl")}["imagesTr/x16.png"] == \
        [0, 4095]
    # a.png is one flat grey and rgba.png all transparent black: kept, but named (the gradient is not)
    assert summary["nearly_uniform_images"] == {"count": 2, "first": [
        "training/Xray/chestdr/imagesTr/a.png", "training/Xray/chestdr/imagesTr/rgba.png"]}


def test_a_dataset_mixing_8_bit_and_high_bit_depth_images_is_said_once_with_counts_and_examples(tmp_path, caplog):
    """An 8-bit image is used as stored, a 16-bit one stretched to its own range: one dataset holding both gets
    two contrast treatments, said once for it (counts per mode, one example each); a dataset of one kind is not
    named, nor are two datasets each of one kind."""
    from flare_exp.data.image_modes import mixed_bit_depths

    root = tmp_path / "raw"
    d = _small_tree(root, [GOOD, {**GOOD, "ImageName": "imagesTr/b.png", "Question": "q1"}]
                    + [{**GOOD, "ImageName": f"imagesTr/x{i}.png", "Question": f"q{i}"} for i in (2, 3, 4)])
    for i in (2, 3, 4):
        Image.fromarray((GRADIENT + i).astype(np.uint16)).save(d / "imagesTr" / f"x{i}.png")
    caplog.set_level("WARNING")
    _prepare(tmp_path, root, "data.datasets=[chestdr]")
    said = [r.getMessage() for r in caplog.records if "mixes 8-bit and high-bit-depth" in r.getMessage()]
    images = "training/Xray/chestdr/imagesTr"
    assert len(said) == 1 and "export them alike" in said[0]
    assert f"dataset chestdr mixes 8-bit and high-bit-depth images (I;16: 3 (e.g. {images}/x2.png); RGB: 2 (e.g. " \
        f"{images}/a.png))" in said[0]
    def row(dataset, count=2):  # a record of ``count`` images, paths named dataset0, dataset1 ...
        return {"dataset": dataset, "_paths": [Path(f"{dataset}{i}") for i in range(count)],
                "images": [f"{dataset}/{i}.png" for i in range(count)]}

    modes = {Path("a0"): "L", Path("a1"): "RGBA", Path("b0"): "I;16", Path("b1"): "F", Path("c1"): "L",
             Path("c0"): "RGB;16 (high bytes only)"}  # PIL's high bytes: used as stored, as 8-bit is
    assert mixed_bit_depths({"train": [row("a"), row("b")], "val": [row("c")]}, modes) == {}
    modes[Path("c0")] = "RGB;16"  # read in full: stretched, beside an 8-bit L
    assert mixed_bit_depths({"val": [row("c")]}, modes) == {
        "c": {"L": {"count": 1, "example": "c/1.png"}, "RGB;16": {"count": 1, "example": "c/0.png"}}}


def test_a_window_that_saturates_an_image_is_named_not_silent(tmp_path, caplog):
    """A full-range 16-bit X-ray under a 12-bit window decodes to nearly all white: prepare keeps it (the
    window is the user's) but names it in the log and summary.json."""
    root = tmp_path / "raw"
    d = _small_tree(root, [{**GOOD, "ImageName": "imagesTr/full16.png"}], images=())
    full = (np.arange(64 * 64) * 16).reshape(64, 64).astype(np.uint16)  # 0..65520: 94% of it above 4095
    Image.fromarray(full).save(d / "imagesTr" / "full16.png")
    caplog.set_level("WARNING", logger="flare_exp.data.prepare")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "data.image_window=[0,4095]")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nearly_uniform_images"]["first"] == ["training/Xray/chestdr/imagesTr/full16.png"]
    assert "data.image_window=[0, 4095] clips most of their values and may not suit them" in caplog.text
    unwindowed = _prepare(tmp_path / "own", root, "data.datasets=[chestdr]")  # its own range: a gradient
    assert json.loads((unwindowed / "summary.json").read_text())["nearly_uniform_images"]["count"] == 0
    blank = (1000 + np.random.default_rng(0).integers(0, 4, (64, 64))).astype(np.uint16)  # a blank 16-bit scan
    Image.fromarray(blank).save(d / "imagesTr" / "full16.png")  # its own range stretches the noise to 0..255
    stretched = _prepare(tmp_path / "blank", root, "data.datasets=[chestdr]")
    assert json.loads((stretched / "summary.json").read_text())["nearly_uniform_images"]["count"] == 1


def test_a_few_extreme_pixels_that_set_the_stretch_are_said_with_the_window_that_holds_the_rest(tmp_path, caplog):
    """A 16-bit X-ray whose own range two hot pixels (or padding written as 65535 around the field) set: its
    anatomy decodes to a handful of grey levels. Prepare names it with the values' range as data.image_window
    (it called the hot-pixel image blank, and the padded one nothing); a real full-range X-ray is not named."""
    from flare_exp.data.images import outlier_stretch

    rng = np.random.default_rng(0)
    anatomy = (961 + np.add.outer(np.arange(64), np.arange(64)) * 16 + rng.integers(0, 8, (64, 64))).astype(np.uint16)
    hot = anatomy.copy()
    hot[3, 5] = hot[40, 7] = 65535
    padded = np.full((64, 64), 65535, dtype=np.uint16)
    padded[13:51, 13:51] = anatomy[13:51, 13:51]  # 35% of the pixels are the field
    assert len(np.unique(np.asarray(decode_image_array(hot)))) <= 12  # what the model saw
    content = outlier_stretch(hot)
    assert content[2:] == (anatomy.min(), 65535.0) and anatomy.min() <= content[0] < 1100 < 2900 < content[1] <= 3000
    assert outlier_stretch(padded)[3] == 65535.0
    assert outlier_stretch(anatomy) is None and outlier_stretch(None) is None
    full = (np.arange(64 * 64) * 16).reshape(64, 64).astype(np.uint16)
    full[0, 0] = 65535  # one hot pixel on a full-range X-ray: its content spans the range anyway
    assert outlier_stretch(full) is None
    binary = np.where(anatomy > 1500, 65535, 0).astype(np.uint16)  # nearly all at the extremes: said elsewhere
    assert outlier_stretch(binary) is None

    root = tmp_path / "raw"
    d = _small_tree(root, [{**GOOD, "ImageName": "imagesTr/hot.png"}, {**GOOD, "ImageName": "imagesTr/pad.png"}],
                    images=())
    Image.fromarray(hot).save(d / "imagesTr" / "hot.png")
    Image.fromarray(padded).save(d / "imagesTr" / "pad.png")
    caplog.set_level("WARNING", logger="flare_exp.data.prepare")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    summary = json.loads((out / "summary.json").read_text())
    said = summary["stretched_by_outliers"]
    assert said["count"] == 2 and summary["nearly_uniform_images"]["count"] == 0, summary
    assert [entry["image"] for entry in said["first"]] == ["training/Xray/chestdr/imagesTr/hot.png",
                                                          "training/Xray/chestdr/imagesTr/pad.png"]
    low, high = said["window_holding_them"]
    assert 961 <= low < 1100 and 2900 < high <= 3000
    assert "2 high-bit-depth image(s) hold nearly all their values in a small part of their own range" in caplog.text
    assert f"data.image_window=[{low:g},{high:g}]" in caplog.text and "blank" not in caplog.text
    windowed = _prepare(tmp_path / "windowed", root, "data.datasets=[chestdr]", f"data.image_window=[{low},{high}]")
    assert json.loads((windowed / "summary.json").read_text())["stretched_by_outliers"]["count"] == 0


def decode_image_array(values):
    """The 8-bit picture the stages decode a 16-bit array to (its own range)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    buffer.seek(0)
    return np.asarray(decode_image(buffer))[..., 0]


def test_processor_limits_come_from_the_models_processor_config(tmp_path):
    from flare_exp.data.images import processor_limits

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "merge_size": 2, "size": {"shortest_edge": 3136, "longest_edge": 1000000}}))
    from omegaconf import OmegaConf

    limits = processor_limits(OmegaConf.create({"path": str(tmp_path), "min_pixels": None, "max_pixels": 4096}))
    assert (limits.patch_size, limits.min_pixels, limits.max_pixels) == (14, 3136, 4096)
    assert limits.problem(13, 100) and limits.problem(14, 100) is None
    assert ProcessorLimits(16, 2, 1024, 4096, "x").problem(20, 5000).startswith("image the processor refuses")
    # transformers 5 saves processor_config.json, the image processor's settings nested (the tiny model's form)
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "patch_size": 14, "merge_size": 2, "size": {"shortest_edge": 3136, "longest_edge": 1000000}}}))
    limits = processor_limits(OmegaConf.create({"path": str(tmp_path), "min_pixels": None, "max_pixels": None}))
    assert (limits.patch_size, limits.min_pixels, limits.max_pixels) == (14, 3136, 1000000)
    assert limits.source == str(tmp_path / "processor_config.json")


def test_a_bad_window_is_named():
    from flare_exp.data.decoding import check_window

    for bad in ([5, 5], [1], [0, float("nan")]):
        with pytest.raises(ValueError, match=r"data.image_window="):
            check_window(bad)


def test_every_pil_mode_in_memory_becomes_rgb_and_premultiplied_grey_is_its_grey():
    """Modes no saved file of ours has (e.g. La, premultiplied grey + alpha, which PIL cannot convert) still
    follow the rule: the grey over black."""
    from flare_exp.data.decoding import to_rgb

    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    for mode in ("1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B",
                 "I;16L", "I;16N", "LA", "La", "PA", "RGBa"):
        assert to_rgb(Image.new(mode, (8, 6))).mode == "RGB", mode
    premultiplied = Image.merge("La", [Image.fromarray(grey), Image.new("L", (8, 6), 128)])
    assert (np.asarray(to_rgb(premultiplied))[..., 1] == grey).all()


def test_an_image_gone_since_prepare_names_the_record_and_the_fix(tmp_path):
    """sft measures each sample from its image headers, every stage decodes them: an image deleted or damaged
    after prepare is an error naming the record and saying to re-run prepare, not a bare Errno."""
    paths = _files(tmp_path / "raw")
    chat = VisionChat(SimpleNamespace(tokenizer=lambda text, add_special_tokens: SimpleNamespace(input_ids=[1])),
                      tmp_path / "raw")
    chat.prompt_text = lambda record: "q"  # the text part: not what is tested here
    record = {"id": "chestdr/7", "images": [paths["L"].name], "messages": [{"role": "user", "content": "q"}]}
    paths["L"].unlink()
    for read in (chat.load_images, lambda r: chat.sequence_length(r, with_answer=False)):
        with pytest.raises(ValueError, match=r"record chestdr/7: cannot read image .*L\.png: .*re-run stage=prepare"):
            read(record)


def test_a_later_stage_given_another_window_than_prepares_is_refused(base_overrides, demo_prepared, tmp_path):
    """data.image_window is prepare's: infer (as sft and rl) set to another window than the records carry stops,
    naming both; unset, or the records' own, it runs."""
    from conftest import compose_cfg
    from flare_exp.data.decoding import check_records_window
    from flare_exp.main import run

    cfg = compose_cfg(["stage=infer", *base_overrides, "infer.num_samples=2", "infer.max_new_tokens=2",
                       "data.image_window=[0,4095]"])
    with pytest.raises(ValueError, match=r"data.image_window=\[0, 4095\], but the records of \S+ were prepared "
                                         r"with each image's own range: the window is prepare's setting"):
        run(cfg, run_dir=tmp_path / "inf")
    from flare_exp.checks import problems_of

    (problem,) = problems_of(cfg, inputs=True)  # checked with the settings, before Hydra makes a run dir
    assert "but the records of" in str(problem) and "val.jsonl" in str(problem)
    records = [{"image_window": [0, 4095]}, {"image_window": None}]
    with pytest.raises(ValueError, match=r"prepared with each image's own range, \[0, 4095\]"):
        check_records_window(records, [0, 4095], "x.jsonl")
    check_records_window(records[:1], [0, 4095], "x.jsonl")  # the records' own window: nothing to say
    check_records_window(records, None, "x.jsonl")


def test_a_multi_page_tiff_is_read_by_its_first_page_and_named(tmp_path, caplog):
    root = tmp_path / "raw"
    d = _small_tree(root, [{**GOOD, "ImageName": "imagesTr/pages.tif"}], images=())
    first = Image.fromarray(GRADIENT.astype(np.uint8))
    first.save(d / "imagesTr" / "pages.tif", save_all=True, append_images=[Image.new("L", (64, 64), 255)])
    caplog.set_level("WARNING", logger="flare_exp.data.prepare")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["multi_page_images"] == {"count": 1, "first": ["training/Xray/chestdr/imagesTr/pages.tif"]}
    assert "every stage reads their first page only" in caplog.text
    assert np.array_equal(np.asarray(decode_image(d / "imagesTr" / "pages.tif"))[..., 0], GRADIENT.astype(np.uint8))


def test_a_float_images_nan_and_infinite_pixels_are_black_or_white_not_mid_grey():
    """NaN (no signal) and -inf read as the low end, +inf as the high end, of the finite range or the window;
    the finite pixels keep their scale."""
    import numpy as np

    from flare_exp.data.decoding import scale_to_8bit

    values = np.array([[-1.0, 2.5, np.nan, np.inf, -np.inf, 0.4]], dtype=np.float32)
    assert scale_to_8bit(values, None).tolist() == [[0, 255, 0, 255, 0, 102]]
    assert scale_to_8bit(values, (0.0, 1.0)).tolist() == [[0, 255, 0, 255, 0, 102]]


def test_a_collimated_scan_is_no_blank_one(tmp_path, caplog):
    """A small exposed field inside a wide border (electronic shutters), with or without noise in the border, 8- or
    16-bit under a window that fits the field: 95% of the pixels at one level, but a picture, named apart as
    framed; so is a field inside shutters stored bright, above the window. A blank exposure (noise only, 8- or
    16-bit), one with a lead marker, a white one with specks, and 16-bit ones whose window clips most of them (a
    band along one side left, or two lung-like blobs: no box they fill) stay nearly flat; only the clipped ones
    blame the window."""
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    field = np.add.outer(np.arange(50) * 4, np.arange(60) * 2).clip(0, 255)  # content with many levels

    def framed8(noise: float = 0.0):
        picture = np.clip(rng.normal(0, noise, (256, 256)), 0, 255) if noise else np.zeros((256, 256))
        picture[100:150, 90:150] = field
        return picture.astype(np.uint8)

    framed16 = np.zeros((256, 256), np.uint16)
    framed16[100:150, 90:150] = 1000 + field * 8  # 1000..3000: the window [1000, 3000] fits the field
    marker = np.zeros((256, 256), np.uint8)
    marker[20:60, 20:45] = 255  # a lead marker on a blank exposure
    specks = np.full((256, 256), 255, np.uint8)
    specks[rng.random((256, 256)) < 0.04] = 0
    clipped = np.full((256, 256), 60000, np.uint16)
    clipped[:20] = np.arange(256, dtype=np.uint16) * 8  # a band along one side inside the window, the rest above
    bright16 = np.full((256, 256), 60000, np.uint16)  # shutters stored bright, the field inside the window
    bright16[100:150, 90:150] = 1000 + field * 8
    lungs = np.full((256, 256), 60000, np.uint16)  # a window too narrow for a chest: two dark blobs left
    yy, xx = np.mgrid[:256, :256]
    for cx in (90, 166):
        lung = ((yy - 128) / 40.0) ** 2 + ((xx - cx) / 20.0) ** 2 < 1
        lungs[lung] = 1000 + (yy + xx)[lung].astype(np.uint16) * 4
    images = {"framed.png": framed8(), "framed_noisy.png": framed8(4.0), "framed16.png": framed16,
              "noise.png": (120 + rng.integers(-3, 4, (256, 256))).astype(np.uint8), "marker.png": marker,
              "specks.png": specks, "clipped16.png": clipped, "bright16.png": bright16, "lungs16.png": lungs}
    names = list(images)
    d = _small_tree(root, [{**GOOD, "ImageName": f"imagesTr/{n}", "Question": f"q{i}"} for i, n in enumerate(names)],
                    images=())
    for name, array in images.items():
        Image.fromarray(array).save(d / "imagesTr" / name)
    caplog.set_level("INFO", logger="flare_exp.data.prepare")
    out = _prepare(tmp_path, root, "data.datasets=[chestdr]", "data.image_window=[1000,3000]")
    summary = json.loads((out / "summary.json").read_text())
    where = "training/Xray/chestdr/imagesTr/"
    assert summary["framed_images"]["first"] == [where + n for n in (
        "bright16.png", "framed.png", "framed16.png", "framed_noisy.png")]
    assert summary["nearly_uniform_images"]["first"] == [where + n for n in sorted(
        ("noise.png", "marker.png", "specks.png", "clipped16.png", "lungs16.png"))]
    assert "hold their content in a box inside a border" in caplog.text
    assert "2 accepted image(s) decoded to nearly one flat grey level (>= 90% of the pixels), e.g. " \
           f"{where}clipped16.png, {where}lungs16.png: data.image_window=[1000, 3000] clips" in caplog.text
    assert "3 accepted image(s) decoded to nearly one flat grey level" in caplog.text


def test_a_blank_16_bit_frame_stretched_to_its_own_range_is_named():
    """A detector frame of noise only (1000 +- 3, a range over 16 values) scaled by its own range becomes
    full-contrast noise: named as blank, also over a heel effect's gradient, while 16-bit X-ray-like pictures
    (smooth, or a shape over the same gradient and noise) are not."""
    from flare_exp.data.images import _check_image

    rng = np.random.default_rng(2)
    tmp = Path(__import__("tempfile").mkdtemp())
    blank = (1000 + rng.normal(0, 3, (256, 256))).astype(np.uint16)
    smooth = (np.add.outer(np.arange(256), np.arange(256)) * 8 + rng.normal(0, 3, (256, 256))).astype(np.uint16)
    across = np.arange(256)[None, :] / 256
    heel = (1000 + 60 * across + 15 * across ** 2 + rng.normal(0, 3, (256, 256))).astype(np.uint16)  # blank + heel
    yy, xx = np.mgrid[:256, :256]
    shaped = (1000 + 60 * across + 40 * (((yy - 128) ** 2 + (xx - 100) ** 2) < 50 ** 2)  # heel, noise and a shape
              + rng.normal(0, 3, (256, 256))).astype(np.uint16)
    for name, array in (("blank.png", blank), ("smooth.png", smooth), ("heel.png", heel), ("shaped.png", shaped)):
        Image.fromarray(array).save(tmp / name)
    assert _check_image(str(tmp / "blank.png"), None).uniform == 1.0
    assert _check_image(str(tmp / "heel.png"), None).uniform == 1.0
    assert _check_image(str(tmp / "smooth.png"), None).uniform < 0.9
    assert _check_image(str(tmp / "shaped.png"), None).uniform < 0.9


def test_one_outlying_pixel_of_a_smooth_image_is_no_blank_frames_noise():
    """A small float gradient with one +inf pixel was listed as nearly uniform: that pixel alone lifted
    the residual's standard deviation above a level; a blank frame's noise is still told."""
    import numpy as np
    from PIL import Image

    from flare_exp.data.images import high_bit_values, stretched_noise, upright_rgb

    for outlier in (np.inf, -np.inf, np.nan):
        values = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
        values[5, 5] = outlier
        image = Image.fromarray(values, mode="F")
        assert not stretched_noise(high_bit_values(image), upright_rgb(image, None))
    noise = Image.fromarray((1000 + np.random.default_rng(0).normal(0, 3, (128, 128))).astype(np.uint16))
    assert stretched_noise(high_bit_values(noise), upright_rgb(noise, None))


def test_no_window_is_suggested_for_stretched_images_whose_values_differ(caplog):
    """One image's anatomy at 1,000-3,000, another's at 40,000-42,000: their union [1000, 42000] would squeeze
    both (and every other high-bit-depth image of the prepare); each range is listed instead."""
    from flare_exp.data.image_notes import say_stretched

    caplog.set_level("WARNING", logger="flare_exp.data.prepare")
    said = say_stretched({Path("a.png"): (1000.0, 3000.0, 1000.0, 65535.0),
                          Path("b.png"): (40000.0, 42000.0, 0.0, 42000.0)}, lambda paths: [str(p) for p in paths])
    assert said["window_holding_them"] is None and [e["content_range"] for e in said["first"]] == [
        [1000.0, 3000.0], [40000.0, 42000.0]]
    assert "no one data.image_window suits them all" in caplog.text and "image_window=[" not in caplog.text
    alike = say_stretched({Path("a.png"): (1000.0, 3000.0, 1000.0, 65535.0),
                           Path("c.png"): (1100.0, 3100.0, 0.0, 65535.0)}, lambda paths: [str(p) for p in paths])
    assert alike["window_holding_them"] == [1000.0, 3100.0]
