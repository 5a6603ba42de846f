"""A corpus of hostile and odd uploads, generated here (no patient data is committed).

Each case: (id, filename, bytes, expected) where expected is "refuse" (a 4xx with a
message) or "predict" (a readable still image: a 200 with a prediction).
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import cv2
import numpy as np
from PIL import Image

from harness.images import synthetic_xray


def _pil(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _xray(h=320, w=280, seed=0) -> Image.Image:
    return Image.fromarray(synthetic_xray(h, w, seed=seed))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_pixel_bomb(side: int = 20000) -> bytes:
    """A real 1-bit side x side PNG of zeros: 400 megapixels in about 50 KB."""
    row = b"\0" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_with_huge_dimensions() -> bytes:
    data = bytearray(_pil(_xray(), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def jpeg_with_corrupt_huffman_table() -> bytes:
    data = bytearray(_pil(_xray(), "JPEG"))
    dht = data.find(b"\xff\xc4")
    for offset in range(dht + 5, dht + 21):  # the code-length counts
        data[offset] = 0xFF
    return bytes(data)


def png_with_bad_crc() -> bytes:
    data = bytearray(_pil(_xray(), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR chunk's CRC
    return bytes(data)


def gif_with_many_frames(frames: int = 60) -> bytes:
    images = [_xray(128, 128, seed=i).convert("P") for i in range(frames)]
    return _pil(images[0], "GIF", save_all=True, append_images=images[1:])


def multipage_tiff() -> bytes:
    pages = [_xray(seed=i) for i in range(3)]
    return _pil(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def cmyk_jpeg() -> bytes:
    return _pil(_xray().convert("CMYK"), "JPEG")


def sixteen_bit_png() -> bytes:
    ok, buffer = cv2.imencode(".png", (synthetic_xray(300, 300, dtype=np.uint16) >> 4).astype(np.uint16))
    return buffer.tobytes()


def rgba_png() -> bytes:
    return _pil(_xray().convert("RGBA"), "PNG")


def zip_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("xray.txt", "not an image")
    return buffer.getvalue()


def pdf_file() -> bytes:
    return _pil(_xray(), "PDF")


def polyglot_jpeg_zip() -> bytes:
    return _pil(_xray(), "JPEG") + zip_file()


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="512" height="512">'
       b'<rect width="512" height="512"/></svg>')
HTML = b"<!doctype html><html><body><script>alert(1)</script></body></html>"


def corpus() -> list[tuple[str, str, bytes, str]]:
    jpeg = _pil(_xray(), "JPEG")
    png = _pil(_xray(), "PNG")
    rng = np.random.default_rng(0)
    return [
        ("empty", "empty.png", b"", "refuse"),
        ("one-byte", "one.jpg", b"\xff", "refuse"),
        ("random-bytes", "noise.jpg", rng.bytes(4096), "refuse"),
        ("truncated-jpeg", "cut.jpg", jpeg[: len(jpeg) // 2], "refuse"),
        ("truncated-png", "cut.png", png[: len(png) // 2], "refuse"),
        ("jpeg-header-only", "head.jpg", jpeg[:300], "refuse"),
        ("corrupt-huffman-jpeg", "huff.jpg", jpeg_with_corrupt_huffman_table(), "either"),
        ("png-bad-crc", "crc.png", png_with_bad_crc(), "refuse"),
        ("png-pixel-bomb-20000", "bomb.png", png_pixel_bomb(), "refuse"),
        ("jpeg-huge-dimensions", "huge.jpg", jpeg_with_huge_dimensions(), "refuse"),
        ("gif-60-frames", "anim.gif", gif_with_many_frames(), "refuse"),
        ("tiff-3-pages", "pages.tif", multipage_tiff(), "refuse"),
        ("one-pixel", "dot.png", _pil(Image.new("L", (1, 1)), "PNG"), "refuse"),
        ("strip-10000x10", "strip.png", _pil(Image.new("L", (10000, 10)), "PNG"), "refuse"),
        ("svg", "vector.svg", SVG, "refuse"),
        ("html-named-jpg", "page.jpg", HTML, "refuse"),
        ("zip", "archive.zip", zip_file(), "refuse"),
        ("pdf", "scan.pdf", pdf_file(), "refuse"),
        ("plain-text-named-png", "notes.png", b"patient notes " * 50, "refuse"),
        ("cmyk-jpeg", "cmyk.jpg", cmyk_jpeg(), "predict"),
        ("png-16-bit", "deep.png", sixteen_bit_png(), "predict"),
        ("png-rgba", "alpha.png", rgba_png(), "predict"),
        ("png-palette", "palette.png", _pil(_xray().convert("P"), "PNG"), "predict"),
        ("png-1-bit", "mono.png", _pil(_xray().convert("1"), "PNG"), "predict"),
        ("jpeg-gray", "gray.jpg", jpeg, "predict"),
        ("jpeg-progressive", "prog.jpg", _pil(_xray(), "JPEG", progressive=True), "predict"),
        ("polyglot-jpeg-zip", "poly.jpg", polyglot_jpeg_zip(), "predict"),
        ("tiff-float", "float.tif", _pil(_xray().convert("F"), "TIFF"), "predict"),
        ("bmp", "film.bmp", _pil(_xray(), "BMP"), "predict"),
        ("webp", "film.webp", _pil(_xray(), "WEBP"), "predict"),
        ("single-frame-gif", "still.gif", _pil(_xray().convert("P"), "GIF"), "predict"),
        ("path-traversal-name", "../../etc/passwd.png", png, "predict"),
        ("nul-and-non-ascii-name", "r\u00f6ntgen\u0000\u80ba.png", png, "predict"),
    ]
