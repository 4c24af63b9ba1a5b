"""Reading image files: the one decoder behind verification, training, validation and prediction.

Every format OpenCV reads (IMAGE_SUFFIXES: JPEG, PNG, BMP, TIFF, WebP) comes out the same way: BGR uint8
[H, W, 3], with the EXIF orientation applied, grayscale and palette images expanded to 3 channels, 16-bit images
scaled to 8 bits and alpha dropped. A JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 size, and a
truncated JPEG is read as far as it goes.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import cv2
import numpy as np

from pyseg.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# EXIF orientations (tag 0x0112) that turn the stored image by 90 degrees, swapping its height and width.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_REDUCED_JPEG_FLAGS = (  # (factor, flag), largest first
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


class ImageReadError(UserError, OSError):
    """An image file that cannot be read or decoded: `cannot read image PATH: REASON`."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {path}: {reason}")

    def __reduce__(self):  # picklable (a loader worker's exception travels to the main process)
        return type(self), (self.path, self.reason)


def check_regular_file(path: str | Path) -> None:
    """ImageReadError unless path is a regular file (or a link to one): reading a FIFO would wait forever for a
    writer, and a device or socket is no image."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path):
            reason = f"a symbolic link to {os.readlink(path)}, which cannot be read ({error.strerror or error})"
            raise ImageReadError(path, reason) from error
        raise ImageReadError(path, error.strerror or str(error)) from error
    if not stat.S_ISREG(mode):
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device); only regular files are read")


def image_header(data: bytes | np.ndarray) -> tuple[str, int, int] | None:
    """(format, height, width) of encoded image bytes from their header, the height and width after EXIF
    orientation (as read_image returns the image); None when Pillow cannot identify the bytes.

    Format is Pillow's name ("JPEG", "PNG", ...). Reads only the header, not the pixels (about 0.1 ms).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image_format = image.format or ""
            try:
                orientation = image.getexif().get(0x0112, 1)
            except (OSError, ValueError, SyntaxError, KeyError, IndexError, TypeError):
                orientation = 1  # damaged EXIF: OpenCV does not apply it either
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # not an image Pillow knows, or too large for it: OpenCV still gets its turn
    if orientation in _TRANSPOSING_ORIENTATIONS:
        height, width = width, height
    return image_format, height, width


JPEG_MAGIC = b"\xff\xd8\xff"  # the first bytes of every JPEG file


def read_image(path: str | Path, fit_px: int | None = None, known_size: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of an image file: BGR uint8 (H, W, 3), EXIF orientation applied.

    Grayscale and palette images become 3 equal channels, 16-bit images are scaled to 8 bits, alpha is dropped
    (not composited). A truncated JPEG is read as far as it goes (OpenCV fills the rest).

    Args:
        path: an image file (any of IMAGE_SUFFIXES; the format is taken from the content, not the suffix).
        fit_px: the side the caller will scale the image to fit, if any. A JPEG whose longer side is at least 2,
            4 or 8 times fit_px is decoded at 1/2, 1/4 or 1/8 of its size (rounded up), several times faster;
            the result is then that much smaller, its longer side still >= fit_px.
        known_size: the (height, width) verification recorded, if any: spares reading the header again (a
            Pillow header parse costs about as much as a small JPEG decode).

    Raises:
        ImageReadError: the file is missing, unreadable, or not an image OpenCV can decode.
    """
    check_regular_file(path)
    try:
        data = np.fromfile(path, np.uint8)  # decoding from bytes skips imread's per-call file handling (~15%)
    except OSError as error:
        raise ImageReadError(path, error.strerror or str(error)) from error
    flag = cv2.IMREAD_COLOR
    if fit_px and len(data) and data[:3].tobytes() == JPEG_MAGIC:
        header = ("JPEG", *known_size) if known_size else image_header(data)
        if header is not None and header[0] == "JPEG":
            shrink = max(header[1], header[2]) / fit_px
            flag = next((reduced for factor, reduced in _REDUCED_JPEG_FLAGS if shrink >= factor), flag)
    if data[:4].tobytes() in _TIFF_MAGIC:
        image = _decode_tiff_with_alpha(data)
        if image is not None:
            return image
    try:
        image = cv2.imdecode(data, flag) if len(data) else None
        if image is None and len(data):  # imdecode rejects a truncated JPEG that imread reads as far as it goes
            image = cv2.imread(os.fspath(path), flag)
    except cv2.error as error:  # e.g. dimensions beyond OpenCV's limits
        raise ImageReadError(path, f"OpenCV cannot decode it ({getattr(error, 'err', '') or 'error'})") from error
    if image is None:
        reason = f"not an image OpenCV decodes ({len(data)} bytes)" if len(data) else "empty file (0 bytes)"
        raise ImageReadError(path, reason)
    return image


def _decode_tiff_with_alpha(data: np.ndarray) -> np.ndarray | None:
    """A TIFF with an alpha channel decoded by Pillow, alpha dropped; None for other TIFFs.

    OpenCV reads these through libtiff's RGBA interface, which multiplies the colours by alpha (a transparent
    region comes out black); every other format keeps the colours as stored, so TIFF does too.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("RGBA", "LA"):
                return None
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # OpenCV gets its turn
