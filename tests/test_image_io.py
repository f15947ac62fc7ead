"""Upload decoding, export encoding and face thumbnails (fluidsrv.image_io)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageCms

from fluidsrv.image_io import (
    DecodedImage,
    ImageError,
    ImageMetadata,
    decode_image,
    encode_image,
    face_thumbnail,
    heic_supported,
    upright_xmp,
)

# ---------------------------------------------------------------------------------------------
# helpers


def upright_picture(height: int = 24, width: int = 36) -> np.ndarray:
    """An asymmetric test picture: a red top-left corner, a green bottom edge, a blue right stripe."""
    picture = np.full((height, width, 3), 128, np.uint8)
    picture[:6, :6] = (255, 0, 0)
    picture[-3:, :] = (0, 255, 0)
    picture[:, -4:] = (0, 0, 255)
    return picture


def encoded(pixels: np.ndarray | Image.Image, image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def exif_bytes(orientation: int = 1, **extra: Any) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    for name, value in extra.items():
        exif[ExifTags.Base[name]] = value
    return exif.tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_header(width: int, height: int, rows: int = 2) -> bytes:
    """A PNG whose header claims width×height, with only a few rows of (highly compressed) data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * (rows * (1 + 3 * width)), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def with_thumbnail_ifd(thumbnail: bytes) -> bytes:
    """A little-endian EXIF block: IFD0 (Orientation 6) followed by IFD1 holding a JPEG thumbnail."""
    ifd0_offset = 8
    ifd1_offset = ifd0_offset + 2 + 12 + 4
    thumbnail_offset = ifd1_offset + 2 + 2 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", ifd0_offset)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<I", ifd1_offset)
    tiff += struct.pack("<H", 2) + struct.pack("<HHII", 0x0201, 4, 1, thumbnail_offset)
    tiff += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + tiff + thumbnail


def assert_refused(data: bytes, status: int, code: str, **kwargs: Any) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, **kwargs)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value
    assert caught.value.message
    return caught.value


# What the camera stored for each EXIF orientation, given the upright picture (EXIF 2.3, tag 0x0112).
STORED_FOR_ORIENTATION = {
    1: lambda p: p,
    2: lambda p: p[:, ::-1],  # mirrored horizontally
    3: lambda p: np.rot90(p, 2),
    4: lambda p: p[::-1],  # mirrored vertically
    5: lambda p: p.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda p: np.rot90(p, 1),  # the viewer turns it 90° clockwise
    7: lambda p: p[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda p: np.rot90(p, -1),  # the viewer turns it 90° counter-clockwise
}


# ---------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("image_format", ["PNG", "WEBP", "JPEG"])
def test_decodes_supported_formats_to_rgb(image_format: str) -> None:
    picture = upright_picture()
    params: dict[str, Any] = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95, "subsampling": 0}, "PNG": {}}
    decoded = decode_image(encoded(picture, image_format, **params[image_format]))
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == picture.shape
    assert decoded.metadata.format == image_format
    error = np.abs(decoded.pixels.astype(int) - picture)
    if image_format == "JPEG":
        assert error.mean() < 3
    else:
        assert error.max() == 0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_honours_exif_orientation(orientation: int) -> None:
    picture = upright_picture()
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](picture))
    decoded = decode_image(encoded(stored, "PNG", exif=exif_bytes(orientation)))
    np.testing.assert_array_equal(decoded.pixels, picture)
    assert decoded.metadata.orientation == orientation


def test_honours_exif_orientation_in_jpeg() -> None:
    picture = upright_picture(48, 64)
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[6](picture))
    decoded = decode_image(encoded(stored, "JPEG", exif=exif_bytes(6), quality=95, subsampling=0))
    assert decoded.pixels.shape == picture.shape
    assert np.abs(decoded.pixels.astype(int) - picture).mean() < 3


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_unreadable_exif_does_not_make_the_photo_unreadable() -> None:
    picture = upright_picture()
    decoded = decode_image(encoded(picture, "PNG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage"))
    np.testing.assert_array_equal(decoded.pixels, picture)


def test_converts_palette_grey_alpha_16bit_and_cmyk() -> None:
    picture = upright_picture()
    # palette with a transparent entry: transparent pixels become white
    palette = Image.fromarray(picture).quantize(colors=8)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    decoded = decode_image(encoded(palette, "PNG", transparency=palette.info["transparency"]))
    np.testing.assert_array_equal(decoded.pixels[0, 0], [255, 255, 255])
    # greyscale and 1-bit
    grey = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (5, 1))
    decoded = decode_image(encoded(Image.fromarray(grey, "L"), "PNG"))
    np.testing.assert_array_equal(decoded.pixels, np.repeat(grey[..., None], 3, axis=2))
    decoded = decode_image(encoded(Image.fromarray(grey > 100), "PNG"))
    np.testing.assert_array_equal(decoded.pixels[..., 0], np.where(grey > 100, 255, 0))
    # RGBA and LA: composited over white
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # opaque red-ish top half, transparent bottom half
    rgba[2, :, 3] = 128
    decoded = decode_image(encoded(rgba, "PNG"))
    np.testing.assert_array_equal(decoded.pixels[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(decoded.pixels[3, 0], [255, 255, 255])
    assert abs(int(decoded.pixels[2, 0, 1]) - 127) <= 1  # half-covered: half white
    la = Image.fromarray(np.dstack([np.full((4, 4), 50, np.uint8), np.full((4, 4), 0, np.uint8)]), "LA")
    np.testing.assert_array_equal(decode_image(encoded(la, "PNG")).pixels, np.full((4, 4, 3), 255))
    # 16-bit greyscale: scaled, not clipped
    deep = np.array([[0, 257, 32768, 65535]], dtype="<u2")
    decoded = decode_image(encoded(Image.frombytes("I;16", (4, 1), deep.tobytes()), "PNG"))
    np.testing.assert_array_equal(decoded.pixels[0, :, 0], [0, 1, 128, 255])
    # CMYK JPEG
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red ink
    decoded = decode_image(encoded(cmyk, "JPEG", quality=100))
    assert decoded.pixels.shape == (8, 8, 3)
    red, green, blue = decoded.pixels[4, 4].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_cmyk_goes_through_its_profile_to_srgb(monkeypatch: pytest.MonkeyPatch) -> None:
    # No CMYK profile ships offline, so stand in for LittleCMS and check the wiring around it.
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    calls: list[tuple[Any, ...]] = []

    def fake_transform(image: Image.Image, source: Any, target: Any, outputMode: str) -> Image.Image:  # noqa: N803
        calls.append((image.mode, source.tobytes(), outputMode))
        return Image.new("RGB", image.size, (1, 2, 3))

    monkeypatch.setattr(ImageCms, "profileToProfile", fake_transform)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    decoded = decode_image(encoded(cmyk, "JPEG", quality=100, icc_profile=profile))
    assert calls == [("CMYK", profile, "RGB")]
    np.testing.assert_array_equal(decoded.pixels, np.full((8, 8, 3), (1, 2, 3)))
    assert decoded.metadata.icc_profile is not None and decoded.metadata.icc_profile[16:20] == b"RGB "  # sRGB
    # a profile LittleCMS cannot read: the naive conversion, and no profile claimed
    broken = b"\x00" * 16 + b"CMYK" + b"\x00" * 200
    decoded = decode_image(encoded(cmyk, "JPEG", quality=100, icc_profile=broken))
    assert len(calls) == 1 and decoded.metadata.icc_profile is None
    assert decoded.pixels[4, 4, 0] > 200 and decoded.pixels[4, 4, 1] < 60


def test_keeps_rgb_profiles_and_drops_grey_ones() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = decode_image(encoded(upright_picture(), "PNG", icc_profile=srgb))
    assert decoded.metadata.icc_profile == srgb
    grey_profile = bytearray(srgb)
    grey_profile[16:20] = b"GRAY"
    grey = Image.fromarray(np.zeros((4, 4), np.uint8), "L")
    decoded = decode_image(encoded(grey, "PNG", icc_profile=bytes(grey_profile)))
    assert decoded.metadata.icc_profile is None


def test_refuses_images_over_the_pixel_limit() -> None:
    data = encoded(upright_picture(100, 100), "PNG")
    assert decode_image(data, max_pixels=10_000).pixels.shape == (100, 100, 3)
    error = assert_refused(data, 413, "image_too_large", max_pixels=9_999)
    assert "10000" in error.message


def test_refuses_decompression_bombs_before_decoding() -> None:
    start = time.perf_counter()
    assert_refused(png_with_header(8_000, 8_000), 413, "image_too_large")  # 64 Mpx > the 50 Mpx default
    assert_refused(png_with_header(60_000, 60_000), 413, "image_too_large")  # Pillow's own bomb guard
    jpeg = bytearray(encoded(upright_picture(), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # claim 60000×60000 in the frame header
    assert_refused(bytes(jpeg), 413, "image_too_large")
    assert time.perf_counter() - start < 2.0  # refused from the headers, nothing was decoded


def test_refuses_uploads_over_the_byte_limit_and_empty_ones() -> None:
    data = encoded(upright_picture(), "PNG")
    assert_refused(data, 413, "upload_too_large", max_bytes=len(data) - 1)
    assert_refused(b"", 400, "empty_upload")


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\n1 0 obj << >> endobj\n",
        b"hello, this is plain text",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        encoded(upright_picture(), "GIF"),
        encoded(upright_picture(), "BMP"),
        encoded(upright_picture(), "TIFF"),
    ],
    ids=["pdf", "text", "svg", "gif", "bmp", "tiff"],
)
def test_refuses_other_types(data: bytes) -> None:
    assert_refused(data, 415, "unsupported_type")


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_refused_cleanly(image_format: str) -> None:
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = encoded(noisy, image_format)
    error = assert_refused(data[: len(data) // 2], 422, "corrupt_image")
    assert "decoded" in error.message


def test_heic_uploads_when_pillow_heif_is_installed() -> None:
    if not heic_supported():
        pytest.skip("pillow-heif is not installed (optional extra 'heic')")
    picture = upright_picture(64, 96)
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[6](picture))
    decoded = decode_image(encoded(stored, "HEIF", exif=exif_bytes(6, Make="Phone"), quality=95))
    assert decoded.metadata.format == "HEIF"
    assert decoded.pixels.shape == picture.shape  # upright
    assert np.abs(decoded.pixels.astype(int) - picture).mean() < 8
    assert decoded.pixels[:6, :6].mean(axis=(0, 1))[0] > 180  # the red corner is top-left
    exported = Image.open(io.BytesIO(encode_image(decoded.pixels, metadata=decoded.metadata)))
    assert exported.getexif()[ExifTags.Base.Make] == "Phone"
    assert exported.getexif()[ExifTags.Base.Orientation] == 1


# ---------------------------------------------------------------------------------------------
# fuzzing: only ImageError ever escapes


def decode_or_refuse(data: bytes) -> None:
    try:
        decoded = decode_image(data, max_pixels=1_000_000)
    except ImageError as error:
        assert error.status in (400, 413, 415, 422)
        return
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3


SEEDS = [
    encoded(upright_picture(), "PNG"),
    encoded(upright_picture(), "JPEG", exif=exif_bytes(6)),
    encoded(upright_picture(), "WEBP"),
    encoded(Image.fromarray(upright_picture()).quantize(colors=4), "PNG"),
]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_refuse(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8), st.data())
def test_fuzz_mutated_images(seed: bytes, flips: list[tuple[int, int]], data: st.DataObject) -> None:
    mutated = bytearray(seed)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    cut = data.draw(st.integers(1, len(mutated)))
    decode_or_refuse(bytes(mutated[:cut]))


# ---------------------------------------------------------------------------------------------
# encoding


def source_jpeg_with_metadata() -> bytes:
    """A JPEG stored sideways (orientation 6) with an ICC profile, EXIF, GPS, XMP and a comment."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "Camera Co"
    exif[ExifTags.Base.Copyright] = "Jane Doe"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2024:05:06 07:08:09"
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.ExifImageWidth] = 48
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.ExifImageHeight] = 64
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "N"
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6" dc:rights="Jane"/></x:xmpmeta>'
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[6](upright_picture(48, 64)))
    return encoded(
        stored, "JPEG", exif=exif.tobytes(), icc_profile=srgb, xmp=xmp, comment=b"hello", dpi=(300, 300), quality=95
    )


@pytest.mark.parametrize("image_format", ["jpeg", "png"])
def test_export_carries_metadata_with_orientation_reset(image_format: str) -> None:
    source = decode_image(source_jpeg_with_metadata())
    assert source.pixels.shape == (48, 64, 3)  # upright
    edited = source.pixels.copy()
    edited[10:20, 10:20] = 0
    exported = Image.open(io.BytesIO(encode_image(edited, image_format, metadata=source.metadata)))
    assert exported.format == image_format.upper()
    assert exported.size == (64, 48)  # original resolution, upright
    exif = exported.getexif()
    assert exif[ExifTags.Base.Orientation] == 1
    assert exif[ExifTags.Base.Make] == "Camera Co"
    assert exif[ExifTags.Base.Copyright] == "Jane Doe"
    exif_ifd = exif.get_ifd(ExifTags.IFD.Exif)
    assert exif_ifd[ExifTags.Base.DateTimeOriginal] == "2024:05:06 07:08:09"
    assert (exif_ifd[ExifTags.Base.ExifImageWidth], exif_ifd[ExifTags.Base.ExifImageHeight]) == (64, 48)
    assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"
    assert exported.info["icc_profile"] == source.metadata.icc_profile
    xmp = exported.info["xmp"]
    assert b'tiff:Orientation="1"' in xmp and b'dc:rights="Jane"' in xmp
    assert exported.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    if image_format == "jpeg":
        assert exported.info["comment"] == b"hello"
    # pixels as given (PNG is lossless)
    if image_format == "png":
        np.testing.assert_array_equal(np.asarray(exported.convert("RGB")), edited)


def test_export_drops_the_exif_thumbnail() -> None:
    thumbnail = encoded(np.zeros((8, 8, 3), np.uint8), "JPEG")
    upload = encoded(upright_picture(), "JPEG", exif=with_thumbnail_ifd(thumbnail))
    source = decode_image(upload)
    assert source.metadata.exif is not None and thumbnail in source.metadata.exif
    exported = encode_image(source.pixels, metadata=source.metadata)
    assert thumbnail not in exported
    reopened = Image.open(io.BytesIO(exported)).getexif()
    assert reopened[ExifTags.Base.Orientation] == 1
    assert reopened.get_ifd(ExifTags.IFD.IFD1) == {}


def test_export_without_metadata_and_bad_input() -> None:
    pixels = upright_picture()
    png = encode_image(pixels, "png")
    reopened = Image.open(io.BytesIO(png))
    assert "exif" not in reopened.info and "icc_profile" not in reopened.info
    np.testing.assert_array_equal(np.asarray(reopened), pixels)
    assert decode_image(encode_image(pixels, "jpeg", quality=90)).pixels.shape == pixels.shape
    with pytest.raises(ValueError, match="JPEG or PNG"):
        encode_image(pixels, "gif")
    with pytest.raises(ValueError, match="uint8"):
        encode_image(pixels.astype(np.float32), "png")
    broken = ImageMetadata(format="JPEG", exif=b"not exif at all", xmp=b"<x/>")
    assert Image.open(io.BytesIO(encode_image(pixels, metadata=broken))).size == (36, 24)


def test_upright_xmp_resets_both_spellings() -> None:
    packet = b"<a tiff:Orientation='8'/><tiff:Orientation> 6 </tiff:Orientation><b tiff:Orientation=\"3\"/>"
    assert (
        upright_xmp(packet)
        == b"<a tiff:Orientation='1'/><tiff:Orientation> 1 </tiff:Orientation><b tiff:Orientation=\"1\"/>"
    )


def test_error_carries_status_code_and_message() -> None:
    error = ImageError(415, "unsupported_type", "nope")
    assert (error.status, error.code, error.message) == (415, "unsupported_type", "nope")
    assert str(error) == "nope"


# ---------------------------------------------------------------------------------------------
# thumbnails


def test_face_thumbnail_is_a_square_around_the_box() -> None:
    photo = np.zeros((400, 600, 3), np.uint8)
    photo[100:200, 300:380] = (250, 10, 10)  # the "face"
    thumbnail = face_thumbnail(photo, (300, 100, 380, 200), size=64, margin=0.25)
    assert thumbnail.shape == (64, 64, 3) and thumbnail.dtype == np.uint8
    red = thumbnail[..., 0] > 128
    rows, cols = np.nonzero(red)
    # the box is 100 tall in a 150-pixel square: 64 * 100 / 150 ≈ 43 rows, centred
    assert abs((rows.max() - rows.min() + 1) - 43) <= 2
    assert abs((rows.max() + rows.min()) / 2 - 31.5) <= 1.5 and abs((cols.max() + cols.min()) / 2 - 31.5) <= 1.5
    corner = face_thumbnail(photo, (0, 0, 40, 40), size=32)  # leaves the photo: still a full square
    assert corner.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="empty"):
        face_thumbnail(photo, (10, 10, 10, 20))
