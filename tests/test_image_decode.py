"""dmjax.image_decode: photos decoded from raster formats only, bounded first, and every failure
one UserError naming the file; and every place that reads a photo goes through it."""

import importlib.util
import io
import os
import pathlib
import re

import numpy as np
import pytest
from conftest import REPO
from PIL import EpsImagePlugin, Image

from dmjax import errors, image_decode
from dmjax.data import tfds_builder
from dmjax.inference import photos

HEIGHT, WIDTH = 20, 24

# The `heif` extra; CI installs it, so there a missing one fails instead of skipping.
HEIF_MISSING = importlib.util.find_spec("pillow_heif") is None and not os.environ.get("CI")


def smooth_photo(seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (3, 4, 3), np.uint8)
  return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))


def encoded(image: np.ndarray | Image.Image, file_format: str, **options) -> bytes:
  buffer = io.BytesIO()
  image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
  image.save(buffer, format=file_format, **options)
  return buffer.getvalue()


PHOTO = smooth_photo()
# Each format the decoder reads, and how far its pixels may move (lossy formats).
FORMATS = {"PNG": ({}, 0), "JPEG": ({"quality": 95, "subsampling": 0}, 8),
           "WEBP": ({"lossless": True}, 0),
           "TIFF": ({}, 0), "BMP": ({}, 0)}


@pytest.mark.parametrize("file_format", sorted(FORMATS))
def test_each_photo_format_decodes_to_its_pixels(file_format):
  options, tolerance = FORMATS[file_format]
  with image_decode.opened(encoded(PHOTO, file_format, **options), "photo") as image:
    assert image.format == file_format
    pixels = np.asarray(image.convert("RGB"), np.int32)
  assert pixels.shape == PHOTO.shape
  assert np.abs(pixels - PHOTO).max() <= tolerance


def test_a_gif_is_read_as_its_first_frame():
  frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ((200, 30, 30),
                                                                     (30, 200, 30))]
  data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
  with image_decode.opened(data, "animation.gif") as image:
    assert image.format == "GIF" and getattr(image, "n_frames", 1) == 2
    pixels = np.asarray(image.convert("RGB"))
  assert (pixels == (200, 30, 30)).all()


@pytest.mark.skipif(HEIF_MISSING, reason='pillow-heif not installed (the optional "heif" '
                    'extra: pip install -c constraints.txt -e ".[heif]")')
def test_heic_with_the_extra():
  # pillow-heif's lossless mode, without chroma subsampling: only YCbCr rounding is left.
  data = encoded(PHOTO, "HEIF", quality=-1, chroma=444)
  assert data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix")
  assert "HEIC" in image_decode.format_names()
  with image_decode.opened(data, "IMG_0001.HEIC") as image:
    pixels = np.asarray(image.convert("RGB"), np.int32)
  assert pixels.shape == PHOTO.shape and np.abs(pixels - PHOTO).max() <= 2


def test_heic_without_the_extra_names_it(monkeypatch):
  monkeypatch.setattr(image_decode, "HEIF_AVAILABLE", False)
  head = b"\0\0\0\x18ftypheic\0\0\0\0"
  assert image_decode._refusal(head) == ("a HEIC photo; reading HEIC needs the optional "
                                         f"pillow-heif: {image_decode.HEIF_INSTALL}")


# PostScript that Ghostscript would run for ever, were it given it.
ENDLESS_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 24 20\n{ } loop\n%%EOF\n"
NOT_PHOTOS = {
    "drawing.eps": (ENDLESS_EPS, "a PostScript/EPS file; only PNG, JPEG, WebP, TIFF, BMP"),
    "page.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "a PDF; only"),
    "logo.svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG drawing; only"),
    "icon.ico": (encoded(PHOTO, "ICO"), "it is not a PNG, JPEG, WebP, TIFF, BMP, GIF"),
    "photo.ppm": (encoded(PHOTO, "PPM"), "it is not a PNG, JPEG"),
    "photo.tga": (encoded(PHOTO, "TGA"), "it is not a PNG, JPEG"),
    "notes.txt": (b"just some text", "it is not a PNG, JPEG"),
    "empty.png": (b"", "it is not a PNG, JPEG"),
}


@pytest.mark.parametrize("name", sorted(NOT_PHOTOS))
def test_other_formats_are_refused_without_being_tried(name, monkeypatch, tmp_path):
  tried = []

  def eps_open(self):  # Pillow's EPS plugin: it would render the file through Ghostscript.
    tried.append(name)
    raise SyntaxError("the EPS plugin was tried (blocked by the test)")

  monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_open)
  data, words = NOT_PHOTOS[name]
  path = tmp_path / name
  path.write_bytes(data)
  for source in (str(path), data):  # A file, or an upload's bytes.
    with pytest.raises(image_decode.UnreadableImage) as info:
      image_decode.decode(source, str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read it as an image (") and words in message
    assert "\n" not in message
  assert tried == []


def corruptions(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
  """Truncations at several points, and copies with a few random bytes changed."""
  cuts = [data[:n] for n in sorted({1, 8, 16, 33, len(data) // 3, len(data) // 2, len(data) - 1})]
  flips = []
  for _ in range(count):
    damaged = bytearray(data)
    for index in rng.integers(0, len(data), rng.integers(1, 4)):
      damaged[index] = rng.integers(0, 256)
    flips.append(bytes(damaged))
  return cuts + flips


@pytest.mark.parametrize("file_format", [*sorted(FORMATS), "GIF"])
def test_every_decode_failure_is_one_user_error(file_format):
  """Damaged files of each format: decoded, or refused as `UnreadableImage`, never another
  exception (struct.error, EOFError, IndexError, ... from Pillow's parsers)."""
  options = FORMATS.get(file_format, ({}, 0))[0]
  data = encoded(PHOTO, file_format, **options)
  refused = 0
  for damaged in corruptions(data, np.random.default_rng(len(data)), count=60):
    try:
      with image_decode.opened(damaged, "x.photo", max_pixels=10 * HEIGHT * WIDTH) as image:
        photos.to_rgb(image, "x.photo")
    except image_decode.UnreadableImage as e:
      assert str(e).startswith("x.photo: ") and "\n" not in str(e)
      refused += 1
  assert refused >= 7  # At least the truncations.


def test_a_damaged_exif_is_a_user_error(tmp_path):
  """Pillow's EXIF parser, run by the EXIF rotation every photo goes through, raises
  struct.error and TypeError on some damaged EXIF blocks: one line naming the file too."""
  exif = Image.Exif()
  exif[0x0112], exif[0x010F] = 6, "Camera"  # Orientation: rotated; the maker.
  data = encoded(PHOTO, "JPEG", exif=exif.tobytes())
  start = data.find(b"Exif")
  rng = np.random.default_rng(0)
  path = tmp_path / "IMG_0001.jpg"
  for _ in range(1500):  # Until the parser's own errors are met (the 277th copy, here).
    damaged = bytearray(data)
    for position in rng.integers(start, start + len(exif.tobytes()), rng.integers(1, 4)):
      damaged[position] = rng.integers(0, 256)
    path.write_bytes(damaged)
    try:
      photos.read_image(str(path))
    except image_decode.UnreadableImage as e:
      assert str(e).startswith(f"{path}: cannot read it as an image (") and "\n" not in str(e)
      if re.match(r"(error|TypeError): ", e.reason[len("cannot read it as an image ("):]):
        return
  pytest.fail("no damaged EXIF block made Pillow's parser fail")


def png_header(width: int, height: int) -> bytes:
  """A PNG that promises width × height pixels and holds none."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_bytes_and_pixels_are_bounded_before_decoding(tmp_path):
  # Pixels from the header: this file has none to decode, so only the header can refuse it.
  with pytest.raises(image_decode.ImageTooLarge, match=re.escape(
      "bomb.png: 5000×4000 is 20,000,000 pixels; at most 1,000,000 per photo")):
    image_decode.decode(png_header(5_000, 4_000), "bomb.png", max_pixels=1_000_000)
  with pytest.raises(image_decode.ImageTooLarge, match="over Pillow's decompression-bomb limit"):
    image_decode.decode(png_header(20_000, 20_000), "bomb.png")
  # Bytes from the file's size: not read past the bound.
  path = tmp_path / "huge.png"
  path.write_bytes(encoded(PHOTO, "PNG") + bytes(5_000_000))
  with pytest.raises(image_decode.ImageTooLarge, match=re.escape(
      f"{path}: {path.stat().st_size:,} bytes; at most 1,000,000 per photo")):
    image_decode.decode(str(path), max_bytes=1_000_000)
  with pytest.raises(image_decode.ImageTooLarge):
    image_decode.decode(path.read_bytes(), "upload", max_bytes=1_000_000)
  assert image_decode.decode(encoded(PHOTO, "PNG"), max_bytes=100_000,
                             max_pixels=HEIGHT * WIDTH).size == (WIDTH, HEIGHT)


def test_a_missing_file_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match=re.escape(f"{tmp_path / 'gone.jpg'}: cannot read it "
                                                       "(No such file or directory)")):
    image_decode.decode(str(tmp_path / "gone.jpg"))


def test_the_callers_read_through_it(tmp_path):
  """The prediction tool's and the dataset's readers refuse PostScript in one line, and no
  module of dmjax opens an image any other way."""
  path = tmp_path / "scan.jpg"  # An extension that says photo; the bytes say PostScript.
  path.write_bytes(ENDLESS_EPS)
  with pytest.raises(errors.UserError, match=re.escape(f"{path}: cannot read it as an image (a "
                                                       "PostScript/EPS file")):
    photos.read_image(str(path))
  example = {key: encoded(PHOTO, "PNG") for key in ("bg", "fg_bg", "mask", "depth")}
  with pytest.raises(errors.UserError, match="^mask: cannot read it as an image"):
    tfds_builder.decode_example({**example, "mask": ENDLESS_EPS})
  opens = [f"{file.relative_to(REPO)}:{number}"
           for file in sorted(pathlib.Path(REPO, "dmjax").rglob("*.py"))
           if file.name != "image_decode.py"
           for number, line in enumerate(file.read_text().splitlines(), 1)
           if re.search(r"Image\.open\(", line)]
  assert opens == [], f"photos opened without dmjax.image_decode: {opens}"
