"""Reading a photo that may be hostile: raster formats only, bytes and pixels bounded first.

  with image_decode.opened(path_or_bytes, "fg_bg.jpg", max_pixels=16_000_000) as image:
    rgb = np.asarray(image.convert("RGB"))
  image = image_decode.decode(path_or_bytes, "fg_bg.jpg")     # decoded, for use after the call

Every place that reads a photo (predict, the server, the dataset builders) decodes it here, so
that:

- Only the formats a photo comes in are decoded (`FORMATS`: PNG, JPEG, WebP, TIFF, BMP, GIF,
  and HEIC/HEIF where the optional `pillow-heif` is installed). Pillow's other plugins are never
  tried: its EPS/PostScript plugin renders through Ghostscript, a subprocess with no timeout (an
  endless PostScript loop hangs the reader for ever; Ghostscript's sandbox escapes run code).
  A GIF (or a WebP, TIFF or HEIC of several frames) is read as its first frame.
- Bytes (`max_bytes`) are checked before anything is parsed, and pixels (`max_pixels`, and
  Pillow's own decompression-bomb bound) from the header, before any pixel is decoded.
- Every failure, whether Pillow's (`UnidentifiedImageError`, `DecompressionBombError`,
  `struct.error`, `EOFError`, a truncated file's `OSError`, ...) or that of decoding in the
  `with` block (`load`, `convert`, the EXIF rotation), becomes one `UnreadableImage` or
  `ImageTooLarge`: a one-line `errors.UserError` naming the file. The server answers them 422
  and 413; a folder run reports the file and goes on.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Callable, Iterator

from PIL import Image

from dmjax import errors

RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
HEIF_FORMAT = "HEIF"  # Pillow's name for HEIC/HEIF once pillow-heif registers its opener.
HEIF_INSTALL = 'pip install -c constraints.txt -e ".[heif]"'

# What Pillow raises on malformed files besides OSError (truncated, broken data) and its
# subclass UnidentifiedImageError: damaged headers, tables and chunks.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
                 TypeError, ZeroDivisionError, Image.DecompressionBombError)

# First bytes of files a photo upload is not, named in the refusal (never opened to find out).
_NOT_RASTER = ((b"%!PS", "a PostScript/EPS file"), (b"\xc5\xd0\xd3\xc6", "an EPS file"),
               (b"%PDF", "a PDF"), (b"<svg", "an SVG drawing"), (b"<?xml", "an XML file"))
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


class UnreadableImage(errors.UserError):
  """Not a photo this reads: another format, damaged, truncated. `reason` is the message without
  the file's name."""

  def __init__(self, what: str, reason: str):
    super().__init__(f"{what}: {reason}")
    self.reason = reason


class ImageTooLarge(UnreadableImage):
  """More bytes or pixels than allowed."""


def _heif_available() -> bool:
  try:
    import pillow_heif  # noqa: PLC0415 (the optional `heif` extra)
  except ImportError:
    return False
  pillow_heif.register_heif_opener()
  return True


HEIF_AVAILABLE = _heif_available()
FORMATS = RASTER_FORMATS + ((HEIF_FORMAT,) if HEIF_AVAILABLE else ())


def format_names(last: str = "and") -> str:
  """The formats read, for messages: 'PNG, JPEG, WebP, TIFF, BMP and GIF' (and HEIC)."""
  names = [{"WEBP": "WebP", HEIF_FORMAT: "HEIC"}.get(name, name) for name in FORMATS]
  return f"{', '.join(names[:-1])} {last} {names[-1]}"


def _what_it_is(head: bytes) -> str:
  for magic, description in _NOT_RASTER:
    if head.lstrip().startswith(magic):
      return description
  if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
    return "a HEIC photo"
  return ""


def _refusal(head: bytes) -> str:
  kind = _what_it_is(head)
  if not kind:
    return f"it is not a {format_names('or')} file"
  if kind == "a HEIC photo":
    return ("a HEIC photo that pillow-heif cannot read" if HEIF_AVAILABLE else
            f"a HEIC photo; reading HEIC needs the optional pillow-heif: {HEIF_INSTALL}")
  return f"{kind}; only {format_names()} photos are read"


def _reason(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read(source: str | bytes, what: str, max_bytes: int | None) -> bytes:
  """The file's bytes, refused past `max_bytes` before they are read."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source) if not isinstance(source, bytes) else source
    if max_bytes is not None and len(data) > max_bytes:
      raise ImageTooLarge(what, f"{len(data):,} bytes; at most {max_bytes:,} per photo")
    return data
  try:
    with open(source, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      if max_bytes is not None and size > max_bytes:
        raise ImageTooLarge(what, f"{size:,} bytes; at most {max_bytes:,} per photo")
      return f.read() if max_bytes is None else f.read(max_bytes + 1)
  except OSError as e:
    raise UnreadableImage(what, f"cannot read it ({e.strerror or e})") from None


def decode(source: str | bytes, what: str | None = None, *, max_pixels: int | None = None,
           max_bytes: int | None = None,
           admit: Callable[[int, int], None] | None = None) -> Image.Image:
  """The photo in `source` (a path, or the file's bytes), its first frame's pixels decoded;
  `what` names it in errors (default: the path).

  Refuses more than `max_bytes` bytes before reading them and more than `max_pixels` pixels
  before decoding them (`ImageTooLarge`), and any format but `FORMATS` or a file that does not
  decode (`UnreadableImage`). `admit(width, height)`, called once the header is read and
  before the pixels are decoded, may refuse too (by raising). The image holds no open file: use
  it, or drop it, as you like.
  """
  what = what or (source if isinstance(source, str) else "image")
  data = _read(source, what, max_bytes)
  try:
    image = Image.open(io.BytesIO(data), formats=FORMATS)
  except Image.UnidentifiedImageError:
    raise UnreadableImage(what, f"cannot read it as an image ({_refusal(data[:16])})") from None
  except Image.DecompressionBombError as e:  # Pillow's bound, checked from the header.
    raise ImageTooLarge(what, f"over Pillow's decompression-bomb limit of "
                        f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels ({_reason(e)})") from None
  except DECODE_ERRORS as e:
    raise UnreadableImage(what, f"cannot read it as an image ({_reason(e)})") from None
  width, height = image.size
  if max_pixels is not None and width * height > max_pixels:
    image.close()
    raise ImageTooLarge(what, f"{width}×{height} is {width * height:,} pixels; at most "
                        f"{max_pixels:,} per photo")
  if admit is not None:
    try:
      admit(width, height)
    except BaseException:
      image.close()
      raise
  try:
    image.load()
  except DECODE_ERRORS as e:
    image.close()
    raise UnreadableImage(what, f"cannot read it as an image ({_reason(e)})") from None
  return image


@contextlib.contextmanager
def opened(source: str | bytes, what: str | None = None, *, max_pixels: int | None = None,
           max_bytes: int | None = None,
           admit: Callable[[int, int], None] | None = None) -> Iterator[Image.Image]:
  """`decode` for a `with` block, closed after it; a failure in the block that comes of the
  file's contents (`DECODE_ERRORS`: the EXIF rotation of a damaged EXIF, say) is an
  `UnreadableImage` too, a `UserError` passes as it is."""
  what = what or (source if isinstance(source, str) else "image")
  with decode(source, what, max_pixels=max_pixels, max_bytes=max_bytes, admit=admit) as image:
    try:
      yield image
    except errors.UserError:
      raise
    except DECODE_ERRORS as e:
      raise UnreadableImage(what, f"cannot read it as an image ({_reason(e)})") from None
