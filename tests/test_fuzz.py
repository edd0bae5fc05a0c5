"""Property-based fuzzing of decode + preprocess (Hypothesis): every PIL mode, 16-bit and palette images, EXIF
orientations, truncations and byte corruption at random offsets, huge declared sizes, 1 x N images. Whatever comes in,
only ImageError comes out, a valid image at least the minimum side is always scored, and memory stays bounded."""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lesion.config import DataConfig
from lesion.data.preprocess import MIN_IMAGE_SIDE, ImageError, decode_image, preprocess_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")  # PIL warns about the corrupt EXIF we feed it
MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I", "F", "LA", "PA", "I;16", "I;16B", "RGBX")
FORMATS = ("PNG", "TIFF", "BMP", "JPEG", "WEBP", "GIF")  # GIF is refused by decode_image: it must be an ImageError
SIDES = st.one_of(st.integers(1, 80), st.sampled_from([1, 2, 31, 32, 33, 300, 10_000]))
FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def config(min_side: int) -> DataConfig:
    """DataConfig at 32 px with ``min_image_side``."""
    return dataclasses.replace(DataConfig(image_size=32), min_image_side=min_side)


def pixels(seed: int, width: int, height: int, sixteen: bool) -> np.ndarray:
    """Random or smooth content, RGBA 8-bit or grey 16-bit."""
    rng = np.random.default_rng(seed)
    if sixteen:
        return rng.integers(0, 65536, (height, width), dtype=np.uint16)
    if seed % 2:
        return rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] + np.zeros((height, 1, 4), np.float32)
    return np.clip(ramp + rng.normal(0, 20, (height, width, 4)), 0, 255).astype(np.uint8)


@st.composite
def encoded_images(draw) -> tuple[bytes, str, tuple[int, int], np.ndarray | None]:
    """(bytes, mode, (width, height), 16-bit values or None) of a valid image in one of FORMATS."""
    width, height = draw(SIDES), draw(SIDES)
    if width * height > 40_000:  # keep 1 x 10000 and 10000 x 1, not 10000 x 10000
        height = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(MODES))
    values = pixels(draw(st.integers(0, 2**16)), width, height, mode.startswith("I;16"))
    if mode.startswith("I;16"):  # big-endian I;16B from a big-endian array (PIL's convert() clips it to 255)
        image = Image.fromarray(values.astype(">u2") if mode == "I;16B" else values)
    else:
        image = Image.fromarray(values, "RGBA").convert(mode)
        values = None
    fmt = draw(st.sampled_from(FORMATS))
    options = {}
    if draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # orientation
        options["exif"] = exif.tobytes()
    if fmt == "JPEG":
        options.update(quality=draw(st.integers(5, 100)), progressive=draw(st.booleans()))
    elif fmt == "TIFF":
        options["compression"] = draw(st.sampled_from([None, "tiff_lzw", "tiff_adobe_deflate", "packbits"]))
    elif fmt == "WEBP":
        options["lossless"] = draw(st.booleans())
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
    except (OSError, ValueError, KeyError, TypeError):  # this format cannot hold this mode: store it as TIFF
        buffer = io.BytesIO()
        image.save(buffer, "TIFF")
        fmt = "TIFF"
    data = buffer.getvalue()
    return data, (mode if fmt != "GIF" else "GIF"), (width, height), values if fmt in ("PNG", "TIFF") else None


def huge_header(data: bytes, side: int) -> bytes:
    """``data`` with its declared width and height set to ``side`` where the format keeps them at a known place."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG"):
        out[16:24] = struct.pack(">II", side, side)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))  # a valid IHDR, so the size is what fails
    elif data.startswith(b"BM"):
        out[18:26] = struct.pack("<ii", side, side)
    elif data.startswith(b"\xff\xd8"):
        at = data.find(b"\xff\xc0") if b"\xff\xc0" in data else data.find(b"\xff\xc2")
        if at > 0:
            out[at + 5:at + 9] = struct.pack(">HH", min(side, 65535), min(side, 65535))
    return bytes(out)


@st.composite
def mutated(draw) -> tuple[bytes, bool]:
    """(bytes, still a valid image?): a valid image, truncated, corrupted, with a huge declared size, or junk."""
    data, mode, size, _ = draw(encoded_images())
    how = draw(st.sampled_from(["none", "truncate", "flip", "huge", "junk", "append"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))], False
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out), False
    if how == "huge":
        return huge_header(data, draw(st.sampled_from([8_000, 65_535, 100_000, 2**31 - 1]))), False
    if how == "junk":
        return draw(st.binary(max_size=256)), False
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64)), False
    return data, mode != "GIF"


def check_scored_or_refused(data: bytes, valid: bool, min_side: int) -> None:
    """The property: a uint8 S x S x 3 image or an ImageError, never another exception; valid + big enough = scored."""
    try:
        out = preprocess_bytes(data, config(min_side))
    except ImageError as exc:
        assert str(exc)  # the reason is named
        if valid:
            width, height = Image.open(io.BytesIO(data)).size
            assert min(width, height) < min_side, f"a valid {width}x{height} image was refused: {exc}"
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@FAST
@given(case=mutated(), min_side=st.sampled_from([1, MIN_IMAGE_SIDE]))
def test_only_image_errors_come_back(case, min_side):
    check_scored_or_refused(*case, min_side)


@pytest.mark.slow
@SLOW
@given(case=mutated(), min_side=st.sampled_from([1, MIN_IMAGE_SIDE]))
def test_only_image_errors_come_back_thousands(case, min_side):
    check_scored_or_refused(*case, min_side)


@FAST
@given(image=encoded_images())
def test_valid_images_decode_to_their_size_and_16_bit_is_scaled(image):
    data, mode, (width, height), sixteen = image
    if mode == "GIF":
        with pytest.raises(ImageError, match="not a decodable image"):
            decode_image(data)
        return
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert sorted(out.shape[:2]) == sorted((height, width))  # EXIF orientations 5-8 swap the sides
    if sixteen is not None and out.shape[:2] == (height, width) and not Image.open(io.BytesIO(data)).getexif():
        assert np.array_equal(out[..., 0], np.rint(sixteen / 257.0).astype(np.uint8))  # scaled, not clipped


def test_small_images_are_refused_by_the_minimum_side():
    for width, height in ((1, 1), (1, 10_000), (10_000, 1), (31, 400)):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (180, 120, 100)).save(buffer, "PNG")
        with pytest.raises(ImageError, match=rf"{width}x{height} is smaller than the minimum side of 32 px"):
            preprocess_bytes(buffer.getvalue(), DataConfig(image_size=32))
        assert preprocess_bytes(buffer.getvalue(), config(1)).shape == (32, 32, 3)  # fine when allowed
    buffer = io.BytesIO()
    Image.new("RGB", (32, 400), (180, 120, 100)).save(buffer, "PNG")
    assert preprocess_bytes(buffer.getvalue(), DataConfig(image_size=32)).shape == (32, 32, 3)


@functools.cache
def png_bomb(side: int) -> bytes:
    """A real decompression bomb: a valid grey PNG of side x side zeros, a few tens of kB compressed."""
    compressor, row = zlib.compressobj(9), bytes(side + 1)  # filter byte + one row of zeros
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_bombs_are_refused_before_decoding():
    bomb = png_bomb(8_000)  # 64 M pixels > the default limit of 50 M
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(bomb)
    small = io.BytesIO()
    Image.new("RGB", (40, 40)).save(small, "JPEG")
    for data in (huge_header(bomb, 100_000), huge_header(small.getvalue(), 60_000)):
        with pytest.raises(ImageError, match="exceeds the limit|too many pixels"):
            decode_image(data)


MEMORY_SCRIPT = """
import resource, sys
from pathlib import Path
from lesion.config import DataConfig
from lesion.data.preprocess import ImageError, preprocess_bytes

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

folder, side = Path(sys.argv[1]), int(sys.argv[2])
bombs = [path.read_bytes() for path in sorted(folder.glob("bomb*"))]
images = [path.read_bytes() for path in sorted(folder.glob("image*"))]
start = peak_mb()
for bomb in bombs:
    try:
        preprocess_bytes(bomb, DataConfig(image_size=64))
        raise SystemExit("a bomb was decoded")
    except ImageError:
        pass
after_bombs = peak_mb()
for data in images:
    preprocess_bytes(data, DataConfig(image_size=64, max_image_pixels=side * side))
print(after_bombs - start, (peak_mb() - after_bombs) * 2**20 / side**2)
"""


def test_memory_stays_bounded(tmp_path):
    """In a fresh process (the peak resident size only grows) that only reads the files: bombs cost almost nothing,
    and an image at the pixel limit costs a bounded number of bytes per pixel, whatever its mode (no float64 or RGBA
    float copies)."""
    side = 1500
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    rgba = np.stack(np.broadcast_arrays(ramp[:, None] * 255, ramp[None, :] * 255, 128, 200), axis=2).astype(np.uint8)
    for mode, fmt in (("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG"), ("P", "BMP"), ("CMYK", "TIFF")):
        if mode == "I;16":
            image = Image.fromarray((ramp[:, None] * ramp[None, :] * 65535).astype(np.uint16))
        else:
            image = Image.fromarray(rgba, "RGBA").convert(mode)
        image.save(tmp_path / f"image-{mode.replace(';', '')}.{fmt.lower()}", fmt,
                   **({"compress_level": 1} if fmt == "PNG" else {}))
    small = io.BytesIO()
    Image.new("RGB", (40, 40)).save(small, "JPEG")
    bombs = [png_bomb(8_000), huge_header(png_bomb(64), 100_000), huge_header(small.getvalue(), 60_000)]
    for i, bomb in enumerate(bombs):
        (tmp_path / f"bomb{i}").write_bytes(bomb)
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), str(side)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    bombs_mb, bytes_per_pixel = map(float, result.stdout.split())
    assert bombs_mb < 20, f"refusing bombs raised the peak memory by {bombs_mb:.0f} MB"
    # about 20 here (hair removal at full size dominates); 64 with float copies of RGBA / 16-bit pixels
    assert bytes_per_pixel < 40, f"decode + preprocess peaked at {bytes_per_pixel:.1f} bytes per pixel"
