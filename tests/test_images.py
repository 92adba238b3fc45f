"""The one image decoder: every PIL mode and format becomes the expected RGB pixels, EXIF orientation is applied,
and every kind of bad input raises ImageError naming the file. Tiny generated images only."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.images
from data.images import ImageError, list_images, load_rgb, to_uint8

W, H = 32, 24
RED, GREEN, WHITE, BLACK = (200, 30, 40), (10, 220, 30), (255, 255, 255), (0, 0, 0)


def two_halves(mode: str) -> tuple[Image.Image, tuple, tuple]:
    """A W x H image in `mode` with different left and right halves, and the RGB each half must decode to."""
    left_value, right_value, left_rgb, right_rgb = {
        "RGB": (RED, GREEN, RED, GREEN),
        "RGBA": (RED + (255,), GREEN + (0,), RED, WHITE),  # transparent -> composited on white
        "LA": ((100, 255), (50, 0), (100,) * 3, WHITE),
        "L": (100, 50, (100,) * 3, (50,) * 3),
        "P": (0, 1, RED, GREEN),
        "CMYK": ((0, 255, 255, 0), (0, 0, 0, 255), (255, 0, 0), BLACK),
        "I;16": (1000, 3000, BLACK, WHITE),  # 16-bit range stretched to 0..255
        "1": (0, 1, BLACK, WHITE),
    }[mode]
    img = Image.new(mode, (W, H), left_value)
    img.paste(Image.new(mode, (W // 2, H), right_value), (W // 2, 0))
    if mode == "P":
        img.putpalette(list(RED + GREEN) + [0] * (256 * 3 - 6))
    return img, left_rgb, right_rgb


CASES = [("JPEG", m) for m in ("RGB", "L", "CMYK", "1")] + \
        [("PNG", m) for m in ("RGB", "RGBA", "LA", "L", "P", "I;16", "1")] + \
        [("BMP", m) for m in ("RGB", "L", "P", "1")] + \
        [("TIFF", m) for m in ("RGB", "RGBA", "LA", "L", "P", "CMYK", "I;16", "1")]
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}


@pytest.mark.parametrize("fmt,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_every_mode_and_format_decodes_to_the_expected_rgb(tmp_path: Path, fmt: str, mode: str):
    img, left, right = two_halves(mode)
    path = tmp_path / f"img{SUFFIX[fmt]}"
    img.save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (W, H)
    arr = np.asarray(out).astype(int)
    tolerance = 12 if fmt == "JPEG" else 0
    assert np.abs(arr[H // 2, W // 4] - left).max() <= tolerance, arr[H // 2, W // 4]
    assert np.abs(arr[H // 2, 3 * W // 4] - right).max() <= tolerance, arr[H // 2, 3 * W // 4]


def test_palette_transparency_composites_on_white(tmp_path: Path):
    img, _, _ = two_halves("P")
    img.info["transparency"] = 1
    path = tmp_path / "p.png"
    img.save(path, transparency=1)
    arr = np.asarray(load_rgb(path))
    assert tuple(arr[H // 2, W // 4]) == RED and tuple(arr[H // 2, 3 * W // 4]) == WHITE


def test_bytes_input(tmp_path: Path):
    img, left, _ = two_halves("RGB")
    path = tmp_path / "a.png"
    img.save(path)
    assert tuple(np.asarray(load_rgb(path.read_bytes()))[0, 0]) == left
    with pytest.raises(ImageError, match="<bytes>"):
        load_rgb(b"not an image at all")


def test_exif_orientation_is_applied(tmp_path: Path):
    img, _, _ = two_halves("RGB")  # red left, green right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    out = load_rgb(path)
    assert out.size == (H, W)
    arr = np.asarray(out).astype(int)
    assert np.abs(arr[W // 4, H // 2] - RED).max() <= 12  # the left half is now on top
    assert np.abs(arr[3 * W // 4, H // 2] - GREEN).max() <= 12


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"bad_{kind}.jpg"
    good = tmp_path / "good.jpg"
    two_halves("RGB")[0].resize((320, 240)).save(good, "JPEG")
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file, not a JPEG\n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "too_small":
        path = path.with_suffix(".png")
        Image.new("RGB", (4, 4)).save(path)
    elif kind == "gif":
        path = path.with_suffix(".gif")
        Image.new("RGB", (16, 16)).save(path)
    elif kind == "bomb_over_limit":  # 81M pixels: over MAX_PIXELS, under PIL's own bomb check
        path = path.with_suffix(".png")
        path.write_bytes(png_header(9000, 9000))
    elif kind == "bomb_huge":  # 10^10 pixels: PIL's DecompressionBombError
        path = path.with_suffix(".png")
        path.write_bytes(png_header(100_000, 100_000))
    return path  # "missing": never written


@pytest.mark.parametrize(("kind", "says"), [
    ("truncated", "not a readable image"), ("empty", "empty file"), ("text", "not a readable image"),
    ("missing", "file not found"), ("folder", "is a folder"), ("too_small", "4x4 is too small"),
    ("gif", "unsupported format GIF"), ("bomb_over_limit", "9000x9000 exceeds the 64,000,000-pixel limit"),
    ("bomb_huge", "possible decompression bomb")])
def test_bad_input_raises_image_error_naming_the_file_and_the_fault(tmp_path: Path, kind: str, says: str):
    path = write_bad(tmp_path, kind)
    with pytest.raises(ImageError) as info:
        load_rgb(path)
    assert path.name in str(info.value) and says in str(info.value)


def test_max_pixels_is_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "ordinary.png"
    Image.new("RGB", (W, H)).save(path)
    load_rgb(path)
    monkeypatch.setattr(data.images, "MAX_PIXELS", W * H - 1)
    with pytest.raises(ImageError, match="ordinary.png.*pixel limit"):
        load_rgb(path)


@pytest.mark.parametrize("rule", ["squash", "center_crop"])
def test_to_uint8_shape_and_dtype(rule: str):
    img = Image.new("RGB", (60, 20), RED)
    arr = to_uint8(img, 16, rule)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_resize_rules_differ_as_documented():
    """Three vertical stripes (red | green | blue) on a 3:1 image: squash keeps all, center_crop keeps the middle."""
    img = Image.new("RGB", (60, 20), RED)
    img.paste(Image.new("RGB", (20, 20), GREEN), (20, 0))
    img.paste(Image.new("RGB", (20, 20), (0, 0, 255)), (40, 0))
    squash, crop = to_uint8(img, 30, "squash").astype(int), to_uint8(img, 30, "center_crop").astype(int)
    assert np.abs(squash[15, 2] - RED).max() <= 8 and np.abs(squash[15, 27] - (0, 0, 255)).max() <= 8
    assert np.abs(crop[15, 2] - GREEN).max() <= 8 and np.abs(crop[15, 27] - GREEN).max() <= 8
    with pytest.raises(ValueError, match="resize rule"):
        to_uint8(img, 30, "stretch")


def test_list_images(tmp_path: Path):
    for name in ("b/z.PNG", "a.jpg", "b/c.tiff", "notes.txt", "d.gif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.jpg", "b/c.tiff", "b/z.PNG"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.jpg"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
