"""The caller's picture and mask for image to image and inpainting: read safely, oriented,
converted and fitted to the requested size (docs/image-to-image.md sections 1 and 2).

Reading follows ComfyUI's LoadImage (the picture) and LoadImageMask with channel red (the mask):
EXIF orientation first, then RGB, then `byte / 255` as float32. Fitting follows A1111's three
resize modes (domain.RESIZE_MODES). Everything a caller sends is untrusted: the header is checked
(format, frame count, pixel count) before a single pixel is decoded, and every Pillow failure
becomes an InvalidArgument naming the field.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from ..domain import RESIZE_MODES
from ..errors import InvalidArgument

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")

# Pillow names a JPEG that carries extra pictures after the main one (MPF: phones' previews,
# depth maps, stereo pairs) "MPO" and counts those pictures as frames. It is a plain JPEG to a
# viewer and to ComfyUI's LoadImage (which excludes MPO from its frame handling), so it is read
# as a JPEG: the main picture, the extras ignored.
_JPEG_WITH_EXTRAS = "MPO"

_ORIENTATION_TAG = 0x0112

# ImageOps.exif_transpose's table: how a picture stored with each EXIF orientation is turned
# upright. 1 (and anything outside 1-8) leaves the picture as stored.
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = (5, 6, 7, 8)  # the quarter turns: an oriented picture's width is its stored height

# What Pillow raises on data it cannot parse or decode: its own OSError family (including
# UnidentifiedImageError and "image file is truncated"), SyntaxError ("not a PNG file", broken
# chunks), and the odd low-level error a malformed file can reach.
_PILLOW_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

# The plugins of the allowed formats, tried one by one only to learn the size a file claims when
# Pillow's own decompression-bomb guard refused it before we saw the size (see _claimed_size).
_ALLOWED_PLUGINS = (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile, WebPImagePlugin.WebPImageFile)

# 16-bit grayscale (Pillow modes "I;16*", and "I" should a 32-bit integer picture appear):
# Pillow's convert("RGB") clips these to 255 (every value above 255 turns white), and ComfyUI's
# v / 255 for mode "I" still saturates at 255 from v = 65280 on. We scale the full 16-bit range
# onto 8 bits instead: v -> round(v / 257), so 0 -> 0, 32896 -> 128, 65535 -> 255, the way a
# viewer shows the file. (Pillow itself reads 16-bit RGB(A) and gray+alpha PNGs as 8-bit by
# keeping the high byte, v >> 8, which differs from this by at most one level.)
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_SIXTEEN_BIT_MAX = 65535


@dataclass(frozen=True)
class PictureHeader:
    format: str  # "PNG" | "JPEG" | "WEBP"
    width: int  # after EXIF orientation
    height: int
    orientation: int  # EXIF orientation tag, 1 when absent (or not one of 1-8)


class _Described(str):
    """A stand-in for a rejected value in an error message, shown as is: errors.describe() shows
    strings with repr(), and the caller's bytes must never be echoed back."""

    def __repr__(self) -> str:
        return str(self)


def _described(data: bytes) -> _Described:
    return _Described(f"<{len(data)} bytes>")


def _refusal(field: str, data: bytes, problem: str) -> InvalidArgument:
    """The caller's `field` refused, shown by its length (never its bytes)."""
    return InvalidArgument(field, _described(data), problem)


def read_header(data: bytes, field: str, max_pixels: int) -> PictureHeader:
    """What the picture claims to be, from its header alone (Pillow's lazy open, no pixel
    decoded); InvalidArgument(field, ...) for empty data, something that is not a picture, a
    format outside ALLOWED_FORMATS, an animated file, or more than max_pixels pixels."""
    image, header = _open(data, field, max_pixels)
    image.close()
    return header


def decode_picture(
    data: bytes,
    field: str,
    max_pixels: int,
    size: tuple[int, int] | None = None,
    resize_mode: str = "just-resize",
) -> torch.Tensor:
    """The picture as float32 (H, W, 3) in [0, 1] (byte / 255), oriented and in RGB as ComfyUI's
    LoadImage reads it; fitted to `size` = (width, height) by `resize_mode` when given and
    different. The same refusals as read_header, plus truncated or corrupt data."""
    rgb = _fit_to(_decode_rgb(data, field, max_pixels), size, resize_mode)
    return _to_unit_float(rgb)


def decode_mask(
    data: bytes,
    field: str,
    max_pixels: int,
    size: tuple[int, int] | None = None,
    resize_mode: str = "just-resize",
) -> torch.Tensor:
    """The mask as float32 (H, W) in [0, 1]: the red channel / 255 after orientation, as
    ComfyUI's LoadImageMask with channel red reads it (a grayscale file: its gray level).
    Fitted exactly as decode_picture fits a picture, so the two stay aligned."""
    red = _decode_rgb(data, field, max_pixels).getchannel("R")
    # Fitting the red channel alone gives the same values as fitting the RGB picture and then
    # taking red: Pillow resamples and pastes each channel independently.
    return _to_unit_float(_fit_to(red, size, resize_mode))


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` brought to width x height by one of A1111's resize modes (domain.RESIZE_MODES),
    Lanczos resampling; ValueError for an unknown mode or a size below 1 x 1."""
    if width < 1 or height < 1:
        raise ValueError(f"cannot fit a picture to {width} x {height}: both sides must be at least 1")
    fitter = _FITTERS.get(mode)
    if fitter is None:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    return fitter(image, width, height)


def crop_to_multiple_of_8(pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """VAEEncode's crop of an (H, W, ...) tensor: each side to the largest multiple of 8 not above
    it, keeping the middle (offset (d % 8) // 2). Returns the cropped view and (top, left).
    A side under 8 crops to 0: callers refuse such sizes before they get here."""
    height, width = pixels.shape[0], pixels.shape[1]
    top, left = (height % 8) // 2, (width % 8) // 2
    kept_width, kept_height = cropped_size(width, height)
    return pixels[top : top + kept_height, left : left + kept_width], (top, left)


def cropped_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) after VAEEncode's crop to multiples of 8."""
    return width // 8 * 8, height // 8 * 8


# ---- reading ----------------------------------------------------------------------------


def _open(data: bytes, field: str, max_pixels: int) -> tuple[Image.Image, PictureHeader]:
    """The lazily opened file (nothing decoded yet) and its checked header; the caller closes it."""
    if not data:
        raise _refusal(field, data, f"empty; a {_formats_text()} picture is required")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # Pillow refuses sizes over 2 x Image.MAX_IMAGE_PIXELS inside open() itself, before the
        # size reaches us; it is still a refusal for too many pixels, so it reads as one.
        raise _too_many_pixels(data, field, max_pixels, _claimed_size(data)) from error
    except _PILLOW_READ_ERRORS as error:
        problem = f"not an image (no known image format); a {_formats_text()} file is required"
        raise _refusal(field, data, problem) from error
    try:
        return image, _checked_header(image, data, field, max_pixels)
    except BaseException:
        image.close()
        raise


def _checked_header(image: Image.Image, data: bytes, field: str, max_pixels: int) -> PictureHeader:
    """Every refusal that needs no pixel: format, size, frame count. The size is checked before
    the frames or the EXIF are asked for, so nothing more is read for an oversized claim."""
    found = _format_of(image)
    if found not in ALLOWED_FORMATS:
        allowed = ", ".join(ALLOWED_FORMATS)
        raise _refusal(field, data, f"a {found} picture; the allowed formats are {allowed}")
    width, height = image.size
    if width < 1 or height < 1:
        raise _refusal(field, data, f"the picture is {width} x {height} pixels; it must be at least 1 x 1")
    if width * height > max_pixels:
        raise _too_many_pixels(data, field, max_pixels, (width, height))
    frames = _frame_count(image)
    if frames > 1:
        raise _refusal(field, data, f"an animated {found} ({frames} frames); a still picture is required")
    orientation = _orientation(image)
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    return PictureHeader(found, width, height, orientation)


def _format_of(image: Image.Image) -> str:
    return "JPEG" if image.format == _JPEG_WITH_EXTRAS else str(image.format)


def _frame_count(image: Image.Image) -> int:
    """Frames as the file declares them (APNG's acTL, WebP's animation header): no decoding."""
    if image.format == _JPEG_WITH_EXTRAS:
        return 1  # the extra pictures are not an animation (see _JPEG_WITH_EXTRAS)
    return int(getattr(image, "n_frames", 1))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (or XMP tiff:Orientation, as exif_transpose also honours), 1 when
    absent, unreadable or not one of 1-8 (exif_transpose leaves those pictures as stored).

    Image.Image.getexif is called directly because PngImageFile.getexif decodes the whole
    picture when no eXIf chunk precedes the image data (to look for one after it). The
    consequence, kept on purpose: a PNG whose EXIF follows the image data is read unrotated,
    by the header and by decoding alike, so that the size read_header reports is always the
    decoded size (ComfyUI would rotate it; writers, Pillow included, put eXIf first)."""
    try:
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
    except _PILLOW_READ_ERRORS:
        return 1  # a broken EXIF block: viewers show such pictures as stored, and so do we
    return value if isinstance(value, int) and value in _TRANSPOSES else 1


def _too_many_pixels(
    data: bytes, field: str, max_pixels: int, size: tuple[int, int] | None
) -> InvalidArgument:
    if size is None:
        claim = f"the picture claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    else:
        width, height = size
        claim = f"the picture claims {width} x {height} = {width * height} pixels"
    return _refusal(field, data, f"{claim}; at most {max_pixels} pixels are allowed")


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """The size an allowed-format header claims, read without Image.open's bomb guard (the plugin
    classes parse the header only); None when no allowed plugin reads it. Used for the message."""
    for plugin in _ALLOWED_PLUGINS:
        try:
            with plugin(io.BytesIO(data)) as image:
                return image.size
        except _PILLOW_READ_ERRORS:
            continue
    return None


def _decode_rgb(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The decoded picture, upright and 8-bit RGB."""
    image, header = _open(data, field, max_pixels)
    with image:
        try:
            image.load()
        except _PILLOW_READ_ERRORS as error:
            problem = f"truncated or corrupt {header.format} data: the picture could not be decoded"
            raise _refusal(field, data, problem) from error
        return _to_rgb(_upright(image, header.orientation))


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """exif_transpose's rotation, by the orientation the header reported (see _orientation)."""
    method = _TRANSPOSES.get(orientation)
    return image if method is None else image.transpose(method)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha dropped (not composited, as ComfyUI), palettes expanded, 16-bit gray
    scaled (see _SIXTEEN_BIT_MODES)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, _SIXTEEN_BIT_MAX)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    return image.convert("RGB")


def _to_unit_float(image: Image.Image) -> torch.Tensor:
    """float32 byte / 255, (H, W, C) for RGB or (H, W) for one channel."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255))


def _formats_text() -> str:
    return ", ".join(ALLOWED_FORMATS[:-1]) + f" or {ALLOWED_FORMATS[-1]}"


# ---- fitting (A1111's resize modes) -------------------------------------------------------


def _fit_to(image: Image.Image, size: tuple[int, int] | None, mode: str) -> Image.Image:
    if mode not in _FITTERS:  # checked even when no fitting is needed, so a bad mode never passes
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")
    if size is None or tuple(size) == image.size:
        return image
    return fit(image, size[0], size[1], mode)


def _lanczos(image: Image.Image, width: int, height: int) -> Image.Image:
    # At least one pixel each way: A1111's integer sizes reach 0 for extreme aspect ratios
    # (a 10000 x 1 strip into a square), where it would fail.
    return image.resize((max(1, width), max(1, height)), resample=Image.Resampling.LANCZOS)


def _just_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Stretched to width x height."""
    return _lanczos(image, width, height)


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to cover width x height with its aspect ratio kept, centred, the overflow cut
    equally from both sides (A1111's integer arithmetic, so results match its pixels)."""
    ratio, source_ratio = width / height, image.width / image.height
    scaled_width = width if ratio > source_ratio else image.width * height // image.height
    scaled_height = height if ratio <= source_ratio else image.height * width // image.width
    scaled = _lanczos(image, scaled_width, scaled_height)
    return _centred(scaled, width, height, image.mode)


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scaled to fit inside width x height with its aspect ratio kept, centred, and the bars on
    either side filled by stretching the picture's edge rows (or columns) across them."""
    ratio, source_ratio = width / height, image.width / image.height
    scaled_width = width if ratio < source_ratio else image.width * height // image.height
    scaled_height = height if ratio >= source_ratio else image.height * width // image.width
    scaled = _lanczos(image, scaled_width, scaled_height)
    canvas = _centred(scaled, width, height, image.mode)
    if ratio < source_ratio:
        _fill_bars_above_and_below(canvas, scaled)
    elif ratio > source_ratio:
        _fill_bars_left_and_right(canvas, scaled)
    return canvas


def _centred(scaled: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`scaled` pasted on a black width x height canvas at A1111's centre offsets (negative when
    it overflows, which crops it)."""
    canvas = Image.new(mode, (width, height))
    canvas.paste(scaled, (width // 2 - scaled.width // 2, height // 2 - scaled.height // 2))
    return canvas


# A1111 stretches an edge with Pillow's resize of a zero-height (or zero-width) box on that edge,
# at Pillow's default resampling (bicubic for RGB and L). Pillow samples such a box with the
# bicubic kernel centred on the edge itself, so a filled row is 1.125 x the edge row - 0.125 x its
# neighbour (clipped to 0-255), not a bare copy of the edge row. The same call reproduces it.
_EDGE_RESAMPLING = Image.Resampling.BICUBIC


def _fill_bars_above_and_below(canvas: Image.Image, scaled: Image.Image) -> None:
    fill_height = canvas.height // 2 - scaled.height // 2
    if fill_height <= 0:
        return
    size = (canvas.width, fill_height)
    top = scaled.resize(size, resample=_EDGE_RESAMPLING, box=(0, 0, scaled.width, 0))
    bottom_edge = (0, scaled.height, scaled.width, scaled.height)
    bottom = scaled.resize(size, resample=_EDGE_RESAMPLING, box=bottom_edge)
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, fill_height + scaled.height))


def _fill_bars_left_and_right(canvas: Image.Image, scaled: Image.Image) -> None:
    fill_width = canvas.width // 2 - scaled.width // 2
    if fill_width <= 0:
        return
    size = (fill_width, canvas.height)
    left = scaled.resize(size, resample=_EDGE_RESAMPLING, box=(0, 0, 0, scaled.height))
    right_edge = (scaled.width, 0, scaled.width, scaled.height)
    right = scaled.resize(size, resample=_EDGE_RESAMPLING, box=right_edge)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (fill_width + scaled.width, 0))


_FITTERS = {
    "just-resize": _just_resize,
    "crop-and-resize": _crop_and_resize,
    "resize-and-fill": _resize_and_fill,
}
assert tuple(_FITTERS) == RESIZE_MODES, "every resize mode the domain accepts has a fitter here"
