"""Reading the caller's picture and mask (engine/pictures.py): formats, refusals, orientation,
conversions, VAEEncode's crop and A1111's resize modes. Pictures are made here with Pillow."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from t2i.domain import RESIZE_MODES
from t2i.engine.pictures import (
    ALLOWED_FORMATS,
    PictureHeader,
    crop_to_multiple_of_8,
    cropped_size,
    decode_mask,
    decode_picture,
    fit,
    read_header,
)
from t2i.errors import InvalidArgument

LIMIT = 4 * 1024 * 1024
LANCZOS = Image.Resampling.LANCZOS


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def units(values: np.ndarray) -> torch.Tensor:
    """What the module must produce for these bytes: float32 byte / 255."""
    return torch.from_numpy(values.astype(np.float32) / np.float32(255))


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append((data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that is nothing but a header claiming width x height RGB pixels (no image data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def refusal(call, *args, **kwargs) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        call(*args, **kwargs)
    return caught.value


# ---- formats ------------------------------------------------------------------------------


def test_png_reads_as_byte_over_255_exactly():
    stored = noise(24, 16)
    pixels = decode_picture(encode(Image.fromarray(stored), "PNG"), "init_image", LIMIT)
    assert pixels.dtype == torch.float32
    assert pixels.shape == (16, 24, 3)
    assert torch.equal(pixels, units(stored))


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True})]
)
def test_each_allowed_format_reads_as_pillow_decodes_it(fmt, options):
    stored = noise(40, 24, seed=1)
    data = encode(Image.fromarray(stored), fmt, **options)
    header = read_header(data, "init_image", LIMIT)
    assert header == PictureHeader(fmt, 40, 24, 1)
    pixels = decode_picture(data, "init_image", LIMIT)
    assert torch.equal(pixels, units(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    if fmt != "JPEG":  # lossless: the stored bytes themselves
        assert torch.equal(pixels, units(stored))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_naming_the_format(fmt):
    data = encode(Image.fromarray(noise(8, 8)), fmt)
    error = refusal(read_header, data, "init_image", LIMIT)
    assert error.field == "init_image"
    assert f"invalid init_image <{len(data)} bytes>: a {fmt} picture" in error.message
    assert ", ".join(ALLOWED_FORMATS) in error.message
    assert refusal(decode_picture, data, "init_image", LIMIT).message == error.message


def test_random_and_empty_bytes_are_refused_without_echoing_them():
    junk = bytes(np.random.default_rng(3).integers(0, 256, 412, dtype=np.uint8))
    error = refusal(decode_picture, junk, "mask", LIMIT)
    assert error.field == "mask"
    assert error.message.startswith("invalid mask <412 bytes>: ")
    assert repr(junk[:4])[2:-1] not in error.message  # no raw bytes in the message
    empty = refusal(read_header, b"", "init_image", LIMIT)
    assert empty.message == "invalid init_image <0 bytes>: empty; a PNG, JPEG or WEBP picture is required"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_data_is_refused_not_an_oserror(fmt):
    data = encode(Image.fromarray(noise(64, 64, seed=4)), fmt)
    cut = data[: len(data) // 2]
    assert read_header(cut, "init_image", LIMIT).format == fmt  # the header survives the cut
    error = refusal(decode_picture, cut, "init_image", LIMIT)
    assert error.message == (
        f"invalid init_image <{len(cut)} bytes>: "
        f"truncated or corrupt {fmt} data: the picture could not be decoded"
    )
    assert refusal(decode_mask, cut, "mask", LIMIT).field == "mask"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_files_are_refused(fmt):
    frames = [Image.fromarray(noise(16, 16, seed=seed)) for seed in range(3)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    error = refusal(read_header, data, "init_image", LIMIT)
    assert error.message.endswith(f"an animated {fmt} (3 frames); a still picture is required")


def test_a_jpeg_with_extra_pictures_reads_as_its_main_picture():
    # Phones write JPEGs with previews appended (MPF); Pillow calls them MPO and counts frames.
    main, extra = noise(32, 16, seed=5), noise(32, 16, seed=6)
    data = encode(Image.fromarray(main), "MPO", save_all=True, append_images=[Image.fromarray(extra)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert read_header(data, "init_image", LIMIT) == PictureHeader("JPEG", 32, 16, 1)
    expected = np.asarray(Image.open(io.BytesIO(encode(Image.fromarray(main), "JPEG"))).convert("RGB"))
    assert torch.equal(decode_picture(data, "init_image", LIMIT), units(expected))


# ---- pixel limit: refused from the header, before any decoding -----------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding fails the test."""

    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(no_decoding):
    data = png_header_only(100_000, 100_000)
    with pytest.raises(Image.DecompressionBombError):  # Pillow's own guard fires on this file...
        Image.open(io.BytesIO(data))
    started = time.perf_counter()
    for call in (read_header, decode_picture, decode_mask):  # ...but only our refusal escapes
        error = refusal(call, data, "init_image", LIMIT)
        assert error.message == (
            f"invalid init_image <{len(data)} bytes>: "
            f"the picture claims 100000 x 100000 = 10000000000 pixels; at most {LIMIT} pixels are allowed"
        )
    assert time.perf_counter() - started < 1.0


def test_a_claim_under_pillows_guard_is_refused_by_ours(no_decoding):
    data = png_header_only(3000, 2000)
    error = refusal(read_header, data, "mask", 5_999_999)
    assert error.message.endswith(
        "the picture claims 3000 x 2000 = 6000000 pixels; at most 5999999 pixels are allowed"
    )
    assert read_header(data, "mask", 6_000_000) == PictureHeader("PNG", 3000, 2000, 1)


def test_a_jpeg_header_claiming_too_many_pixels_is_refused(no_decoding):
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", 65000, 60000)
    error = refusal(decode_picture, bytes(data), "init_image", LIMIT)
    assert "the picture claims 60000 x 65000 = 3900000000 pixels" in error.message


# ---- orientation ---------------------------------------------------------------------------


def test_orientation_6_turns_a_256_wide_320_high_picture_into_320_wide_256_high():
    stored = noise(256, 320, seed=7)  # stored 256 wide x 320 high
    data = encode(Image.fromarray(stored), "PNG", exif=exif_with_orientation(6))
    assert read_header(data, "init_image", LIMIT) == PictureHeader("PNG", 320, 256, 6)
    pixels = decode_picture(data, "init_image", LIMIT)
    assert pixels.shape == (256, 320, 3)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert torch.equal(pixels, units(expected))
    assert torch.equal(pixels, units(np.rot90(stored, k=-1).copy()))  # a quarter turn clockwise


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_exif_transpose(orientation):
    stored = noise(12, 20, seed=orientation)
    data = encode(Image.fromarray(stored), "PNG", exif=exif_with_orientation(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    header = read_header(data, "init_image", LIMIT)
    assert (header.height, header.width) == expected.shape[:2]
    assert header.orientation == orientation
    assert torch.equal(decode_picture(data, "init_image", LIMIT), units(expected))
    assert torch.equal(decode_mask(data, "mask", LIMIT), units(expected[..., 0]))


def test_a_jpeg_header_reports_its_orientation():
    data = encode(Image.fromarray(noise(256, 320)), "JPEG", exif=exif_with_orientation(8))
    assert read_header(data, "init_image", LIMIT) == PictureHeader("JPEG", 320, 256, 8)


def test_a_png_whose_exif_follows_the_image_data_reads_as_stored_by_header_and_decoding_alike():
    # Documented choice: seeing that EXIF would mean decoding in read_header, and the header's
    # size must be the decoded size.
    stored = noise(8, 12, seed=8)
    chunks = png_chunks(encode(Image.fromarray(stored), "PNG", exif=exif_with_orientation(6)))
    exif = [chunk for chunk in chunks if chunk[0] == b"eXIf"]
    others = [chunk for chunk in chunks if chunk[0] not in (b"eXIf", b"IEND")]
    assert len(exif) == 1
    data = b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(*chunk) for chunk in others + exif + [(b"IEND", b"")])
    assert read_header(data, "init_image", LIMIT) == PictureHeader("PNG", 8, 12, 1)
    assert torch.equal(decode_picture(data, "init_image", LIMIT), units(stored))


# ---- conversions ---------------------------------------------------------------------------


def test_rgba_reads_as_its_rgb_with_alpha_dropped_not_composited():
    rgba = noise(10, 6, seed=9, channels=4)
    rgba[..., 3] = 0  # fully transparent: compositing on any background would change the colours
    pixels = decode_picture(encode(Image.fromarray(rgba), "PNG"), "init_image", LIMIT)
    assert torch.equal(pixels, units(rgba[..., :3]))


def test_a_palette_picture_reads_as_its_colours():
    palette_picture = Image.fromarray(noise(16, 8, seed=10)).quantize(colors=8)
    assert palette_picture.mode == "P"
    data = encode(palette_picture, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = np.asarray(palette_picture.convert("RGB"))
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 1
    assert torch.equal(decode_picture(data, "init_image", LIMIT), units(expected))


def test_16_bit_grayscale_scales_the_full_range_onto_8_bits():
    values = np.array([[0, 128, 300, 32896, 65407, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = decode_picture(data, "init_image", LIMIT)
    eight_bit = np.array([[0, 0, 1, 128, 255, 255]], dtype=np.uint8)  # round(v / 257)
    assert torch.equal(pixels, units(np.repeat(eight_bit[..., None], 3, axis=2)))
    assert torch.equal(decode_mask(data, "mask", LIMIT), units(eight_bit))


# ---- masks ---------------------------------------------------------------------------------


def test_an_rgb_mask_is_its_red_channel():
    stored = noise(14, 9, seed=11)
    mask = decode_mask(encode(Image.fromarray(stored), "PNG"), "mask", LIMIT)
    assert mask.dtype == torch.float32
    assert mask.shape == (9, 14)
    assert torch.equal(mask, units(stored[..., 0]))


def test_an_rgba_mask_is_its_red_channel_whatever_its_alpha():
    stored = noise(14, 9, seed=12, channels=4)
    mask = decode_mask(encode(Image.fromarray(stored), "PNG"), "mask", LIMIT)
    assert torch.equal(mask, units(stored[..., 0]))


def test_a_grayscale_mask_is_its_gray_level_with_intermediate_values_kept():
    gray = np.array([[0, 128, 255], [1, 64, 254]], dtype=np.uint8)
    mask = decode_mask(encode(Image.fromarray(gray), "PNG"), "mask", LIMIT)
    assert mask[0, 1].item() == pytest.approx(128 / 255)
    assert torch.equal(mask, units(gray))


def test_a_mask_is_fitted_exactly_as_the_picture():
    gray = noise(30, 20, seed=13, channels=1)
    data = encode(Image.fromarray(gray), "PNG")
    for mode in RESIZE_MODES:
        picture = decode_picture(data, "init_image", LIMIT, size=(24, 24), resize_mode=mode)
        mask = decode_mask(data, "mask", LIMIT, size=(24, 24), resize_mode=mode)
        assert mask.shape == (24, 24)
        assert torch.equal(mask, picture[..., 0]), mode


# ---- fitting through decode ----------------------------------------------------------------


def test_decoding_fits_the_upright_picture_to_the_requested_size():
    stored = noise(40, 30, seed=14)  # stored 40 x 30, upright 30 x 40 after orientation 6
    data = encode(Image.fromarray(stored), "PNG", exif=exif_with_orientation(6))
    upright = Image.fromarray(np.rot90(stored, k=-1).copy())
    pixels = decode_picture(data, "init_image", LIMIT, size=(32, 48), resize_mode="crop-and-resize")
    assert pixels.shape == (48, 32, 3)
    assert torch.equal(pixels, units(np.asarray(fit(upright, 32, 48, "crop-and-resize"))))


def test_decoding_at_the_pictures_own_size_does_not_resample():
    stored = noise(20, 12, seed=15)
    data = encode(Image.fromarray(stored), "PNG")
    for mode in RESIZE_MODES:
        pixels = decode_picture(data, "init_image", LIMIT, size=(20, 12), resize_mode=mode)
        assert torch.equal(pixels, units(stored))


def test_an_unknown_resize_mode_is_a_value_error():
    data = encode(Image.fromarray(noise(8, 8)), "PNG")
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        decode_picture(data, "init_image", LIMIT, size=(16, 16), resize_mode="stretch")
    with pytest.raises(ValueError, match="unknown resize mode 'stretch'"):
        decode_mask(data, "mask", LIMIT, resize_mode="stretch")  # even when nothing is fitted
    with pytest.raises(ValueError, match="one of just-resize, crop-and-resize, resize-and-fill"):
        fit(Image.new("RGB", (8, 8)), 16, 16, "stretch")


# ---- VAEEncode's crop ----------------------------------------------------------------------


def test_crop_to_multiple_of_8_keeps_the_middle():
    pixels = torch.arange(260 * 268 * 3, dtype=torch.float32).reshape(260, 268, 3)  # 268 wide x 260 high
    cropped, offsets = crop_to_multiple_of_8(pixels)
    assert cropped.shape == (256, 264, 3)
    assert offsets == (2, 2)
    assert torch.equal(cropped, pixels[2:258, 2:266])
    assert cropped_size(268, 260) == (264, 256)


def test_crop_offsets_differ_per_side():
    pixels = torch.rand(13, 30, 3)  # 30 wide (offset 3), 13 high (offset 2)
    cropped, offsets = crop_to_multiple_of_8(pixels)
    assert offsets == (2, 3)
    assert torch.equal(cropped, pixels[2:10, 3:27])
    assert cropped_size(30, 13) == (24, 8)


def test_a_side_under_8_crops_to_nothing():
    # Documented: callers refuse such sizes; the crop itself just keeps no column.
    cropped, offsets = crop_to_multiple_of_8(torch.rand(16, 7, 3))
    assert cropped.shape == (16, 0, 3)
    assert offsets == (0, 3)
    assert cropped_size(7, 16) == (0, 16)


# ---- fit: A1111's resize modes -------------------------------------------------------------


def three_bands(width: int, height: int, vertical: bool = True) -> Image.Image:
    """Red, green, blue thirds: side by side (vertical bands) or stacked."""
    picture = np.zeros((height, width, 3), dtype=np.uint8)
    for index in range(3):
        if vertical:
            picture[:, index * width // 3 : (index + 1) * width // 3, index] = 255
        else:
            picture[index * height // 3 : (index + 1) * height // 3, :, index] = 255
    return Image.fromarray(picture)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize(
    ("source", "target"), [((90, 30), (64, 64)), ((30, 90), (64, 48)), ((50, 50), (40, 72))]
)
def test_every_mode_produces_the_requested_size(mode, source, target):
    result = fit(Image.fromarray(noise(*source)), *target, mode)
    assert result.size == target
    assert result.mode == "RGB"


def test_just_resize_is_a_lanczos_stretch():
    picture = Image.fromarray(noise(90, 30, seed=16))
    expected = picture.resize((64, 64), LANCZOS)
    assert np.array_equal(np.asarray(fit(picture, 64, 64, "just-resize")), np.asarray(expected))


def test_crop_and_resize_keeps_the_middle_of_a_wide_picture():
    picture = three_bands(300, 100)  # 3:1, red | green | blue
    result = fit(picture, 100, 100, "crop-and-resize")
    # Scaled to 300 x 100 (here: unchanged) and cut 100 columns from each side: only green is left.
    assert np.array_equal(np.asarray(result), np.asarray(picture.crop((100, 0, 200, 100))))
    assert tuple(np.asarray(result)[50, 0]) == (0, 255, 0)  # the red left edge is gone


def test_crop_and_resize_scales_then_cuts_equally_from_both_sides():
    picture = Image.fromarray(noise(400, 200, seed=17))
    result = fit(picture, 100, 100, "crop-and-resize")
    expected = picture.resize((200, 100), LANCZOS).crop((50, 0, 150, 100))
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def test_resize_and_fill_stretches_the_edge_rows_of_a_wide_picture_above_and_below():
    stored = noise(200, 100, seed=18)
    stored[:10] = (200, 40, 90)  # a plain top band: the stretched first row is that colour
    stored[-10:] = (10, 220, 30)
    picture = Image.fromarray(stored)
    result = np.asarray(fit(picture, 100, 100, "resize-and-fill"))
    scaled = np.asarray(picture.resize((100, 50), LANCZOS))
    # Scaled to 100 x 50, pasted at row 25; rows 0-24 and 75-99 are the filled bars.
    assert np.array_equal(result[25:75], scaled)
    assert np.array_equal(result[:25], np.broadcast_to(scaled[0], (25, 100, 3)))
    assert np.array_equal(result[75:], np.broadcast_to(scaled[-1], (25, 100, 3)))
    assert tuple(result[0, 0]) == (200, 40, 90)


def test_resize_and_fill_edges_are_pillows_zero_height_box_resize_as_a1111_does():
    # With different first rows, A1111's stretched row is Pillow's bicubic sample at the edge
    # (1.125 x the first row - 0.125 x the second), which this reproduces.
    picture = Image.fromarray(noise(200, 100, seed=19))
    result = np.asarray(fit(picture, 100, 100, "resize-and-fill"))
    scaled = picture.resize((100, 50), LANCZOS)
    top = scaled.resize((100, 25), Image.Resampling.BICUBIC, box=(0, 0, 100, 0))
    bottom = scaled.resize((100, 25), Image.Resampling.BICUBIC, box=(0, 50, 100, 50))
    assert np.array_equal(result[:25], np.asarray(top))
    assert np.array_equal(result[75:], np.asarray(bottom))
    assert not np.array_equal(result[:25], np.broadcast_to(np.asarray(scaled)[0], (25, 100, 3)))


def test_resize_and_fill_stretches_the_edge_columns_of_a_tall_picture_left_and_right():
    stored = noise(60, 120, seed=20)
    stored[:, :8] = (5, 6, 7)
    stored[:, -8:] = (250, 251, 252)
    picture = Image.fromarray(stored)
    result = np.asarray(fit(picture, 90, 60, "resize-and-fill"))
    scaled = np.asarray(picture.resize((30, 60), LANCZOS))
    # Scaled to 30 x 60, pasted at column 45 - 15 = 30; columns 0-29 and 60-89 are filled.
    assert np.array_equal(result[:, 30:60], scaled)
    assert np.array_equal(result[:, :30], np.broadcast_to(scaled[:, :1], (60, 30, 3)))
    assert np.array_equal(result[:, 60:], np.broadcast_to(scaled[:, -1:], (60, 30, 3)))


def test_resize_and_fill_with_an_odd_gap_leaves_no_black_row():
    picture = Image.fromarray(np.full((41, 64, 3), 77, dtype=np.uint8))
    result = np.asarray(fit(picture, 64, 64, "resize-and-fill"))  # 41 rows in 64: gaps of 12 and 11
    assert (result == 77).all()


def test_resize_and_fill_survives_an_extreme_aspect_ratio():
    strip = Image.fromarray(np.full((1, 2000, 3), 90, dtype=np.uint8))  # scaled height would be 0
    result = fit(strip, 64, 64, "resize-and-fill")
    assert result.size == (64, 64)
    assert (np.asarray(result) == 90).all()


def test_fit_keeps_a_single_channel_picture_single_channel():
    gray = Image.fromarray(noise(90, 30, seed=21, channels=1))
    for mode in RESIZE_MODES:
        result = fit(gray, 48, 48, mode)
        assert result.mode == "L"
        rgb = fit(gray.convert("RGB"), 48, 48, mode)
        assert np.array_equal(np.asarray(result), np.asarray(rgb)[..., 0]), mode


def test_fit_refuses_an_empty_size():
    with pytest.raises(ValueError, match="0 x 64"):
        fit(Image.new("RGB", (8, 8)), 0, 64, "just-resize")
