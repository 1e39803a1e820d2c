"""Reads the original system's dataset layout (SPEC §4) from folders or straight from zips.

A dataset root holds four folders (names from `config.data.original_layout`):

  bg/      the background photos; the bg of composite `b{bg}` is entry number `bg - 1` of the
           sorted folder
  bg_fg/   the composites, named by `fg_bg_pattern` (a regex with the groups `bg`, `fg`, `i`)
  mask/    their masks, named by `mask_pattern` (a format string over the same groups)
  depth/   their depth maps, named by `depth_pattern`

Each folder may be unpacked under the root, or sit inside any zip in the root (e.g. `bg.zip`
holding `bg/…` or the files themselves, or one zip holding all four); the root may itself be a
zip. Files are read from the zips in place, never unpacked.

Problems (a missing partner, a bg number out of range, an unreadable image, sizes that differ,
a file over `MAX_FILE_BYTES`, depth values outside 16 bits) raise a one-line ValueError naming
the file; with `skip_bad` they skip the example instead and are counted and listed in
`OriginalLayout.skipped` and the log.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from dmjax import errors, image_decode
from dmjax.data import schema

FOLDER_KEYS = ("bg_dir", "fg_bg_dir", "mask_dir", "depth_dir")
SPLIT_KINDS = ("image", "background")
_PATTERN_GROUPS = ("bg", "fg", "i")
_SKIP_HINT = "set config.data.original_layout.skip_bad=True to skip bad examples"
# Bytes read of one file, or one zip member whatever its header declares (a zip bomb expands a
# few kB into gigabytes): 16-bit PNG depth at 8k x 8k is 128 MiB, the original's files ~20 kB.
MAX_FILE_BYTES = 256 << 20
# What reading a zip member can raise besides OSError: a damaged archive or deflate stream,
# a member cut short, an encrypted one or a compression zipfile does not know.
_ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
               NotImplementedError)


@dataclasses.dataclass(frozen=True)
class FileRef:
  """Where one file is: a plain file (`member` empty) or a member of the zip `container`."""

  container: str
  member: str = ""

  @property
  def name(self) -> str:
    return os.path.basename(self.member or self.container)

  def __str__(self) -> str:
    return f"{self.container}:{self.member}" if self.member else self.container


@dataclasses.dataclass(frozen=True)
class Composite:
  """One example: a composite and its partners."""

  key: str  # The composite's file name; unique within the dataset.
  bg_index: int  # 0-based position of its background in the sorted bg folder.
  fg_bg: FileRef
  mask: FileRef
  depth: FileRef
  bg: FileRef


class BadExampleError(ValueError):
  """An example whose files are missing, unreadable or inconsistent."""


class OriginalLayout:
  """The composites of one dataset root, paired with their partners and checked by name.

  Decoding checks (readable images, equal sizes) happen when an example is loaded, so scanning
  400k names stays fast; use `encoded_examples` to walk a list of composites with `skip_bad`
  applied.
  """

  def __init__(self, root: str, layout: ml_collections.ConfigDict, *,
               max_file_bytes: int = MAX_FILE_BYTES):
    self.root = root
    self.layout = layout
    self.max_file_bytes = max_file_bytes
    self.skip_bad = bool(layout.skip_bad)
    self.skipped: list[tuple[str, str]] = []  # (file, what is wrong) of every skipped example.
    self._zips: dict[str, zipfile.ZipFile] = {}
    self._bg_cache: dict[int, tuple[np.ndarray, bytes]] = {}
    folders = _index_folders(root, [layout[key] for key in FOLDER_KEYS])
    self._bg_files = [folders[layout.bg_dir][name] for name in sorted(folders[layout.bg_dir])]
    self.composites = self._pair(folders)

  @property
  def num_backgrounds(self) -> int:
    return len(self._bg_files)

  def close(self) -> None:
    for archive in self._zips.values():
      archive.close()
    self._zips.clear()

  def __enter__(self) -> OriginalLayout:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _pair(self, folders: Mapping[str, Mapping[str, FileRef]]) -> list[Composite]:
    layout = self.layout
    pattern = re.compile(layout.fg_bg_pattern)
    missing_groups = set(_PATTERN_GROUPS) - set(pattern.groupindex)
    if missing_groups:
      raise errors.UserError(f"config.data.original_layout.fg_bg_pattern="
                             f"{layout.fg_bg_pattern!r} "
                             f"lacks the named group(s) {sorted(missing_groups)}")
    composites, problems, unmatched = [], [], []
    for name in sorted(folders[layout.fg_bg_dir]):
      match = pattern.fullmatch(name)
      if match is None:
        unmatched.append(name)
        continue
      fg_bg = folders[layout.fg_bg_dir][name]
      groups = match.groupdict()
      partners, own_problems = {}, []
      for part in ("mask", "depth"):
        folder = layout[f"{part}_dir"]
        partner_name = layout[f"{part}_pattern"].format(**groups)
        partners[part] = folders[folder].get(partner_name)
        if partners[part] is None:
          own_problems.append(f"missing {part} partner {folder}/{partner_name}")
      bg_index = int(groups["bg"]) - 1
      if not 0 <= bg_index < len(self._bg_files):
        own_problems.append(f"bg number {groups['bg']} is out of range: {layout.bg_dir}/ has "
                            f"{len(self._bg_files)} images")
      if own_problems:
        problems.append((str(fg_bg), "; ".join(own_problems)))
      else:
        composites.append(Composite(key=name, bg_index=bg_index, fg_bg=fg_bg,
                                    bg=self._bg_files[bg_index], **partners))
    if unmatched:
      logging.warning("%s: %d file(s) in %s/ do not match fg_bg_pattern and are ignored, e.g. %s",
                      self.root, len(unmatched), layout.fg_bg_dir, unmatched[:3])
    if problems and not self.skip_bad:
      file, what = problems[0]
      more = f" (and {len(problems) - 1} more bad examples)" if len(problems) > 1 else ""
      raise errors.UserError(f"{file}: {what}{more}; {_SKIP_HINT}")
    self._skip(problems)
    if not composites:
      raise errors.UserError(f"{self.root}: no composite in {layout.fg_bg_dir}/ matches "
                             f"fg_bg_pattern={layout.fg_bg_pattern!r}")
    return composites

  def _skip(self, problems: Sequence[tuple[str, str]]) -> None:
    for file, what in problems:
      logging.warning("Skipping %s: %s", file, what)
    self.skipped.extend(problems)

  def read_bytes(self, ref: FileRef) -> bytes:
    """The file's bytes. One larger than `max_file_bytes`, by its size or its zip header, is
    refused before it is read, and no more than that is read whatever the header says; that
    and any failure to read are a BadExampleError naming the file."""
    limit, data = self.max_file_bytes, b""
    try:
      if ref.member:
        if ref.container not in self._zips:
          self._zips[ref.container] = zipfile.ZipFile(ref.container)
        archive = self._zips[ref.container]
        size = archive.getinfo(ref.member).file_size
        if size <= limit:
          with archive.open(ref.member) as member:
            data = member.read(limit + 1)
      else:
        with open(ref.container, "rb") as file:
          size = os.fstat(file.fileno()).st_size
          if size <= limit:
            data = file.read(limit + 1)
    except _ZIP_ERRORS as exc:
      raise BadExampleError(f"{ref}: unreadable ({_one_line(exc)})") from exc
    if size > limit or len(data) > limit:
      raise BadExampleError(f"{ref}: {max(size, len(data)):,} bytes, over the limit of "
                            f"{limit:,} for one file")
    return data

  def _decode(self, ref: FileRef, data: bytes | None = None) -> Image.Image:
    try:
      data = self.read_bytes(ref) if data is None else data
      image = image_decode.decode(data, str(ref))  # Raster formats only: dmjax.image_decode.
    except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as exc:
      reason = exc.reason if isinstance(exc, image_decode.UnreadableImage) else _one_line(exc)
      raise BadExampleError(f"{ref}: unreadable image ({reason})") from exc
    return image

  def _background(self, composite: Composite) -> tuple[np.ndarray, bytes]:
    """The decoded background and its bytes to store; decoded once per background."""
    if composite.bg_index not in self._bg_cache:
      data = self.read_bytes(composite.bg)
      image = self._decode(composite.bg, data)
      bg = _rgb(image)
      self._bg_cache[composite.bg_index] = (
          bg, data if _is_stored_format(image, "RGB") else encode_png(bg))
    return self._bg_cache[composite.bg_index]

  def load(self, composite: Composite) -> dict[str, np.ndarray]:
    """Decodes one example into the stored format of `dmjax.data.schema`."""
    return {key: value for key, (value, _) in self._load_with_bytes(composite).items()}

  def encoded(self, composite: Composite) -> dict[str, bytes]:
    """One example as encoded images for the TFDS builder; see `_load_with_bytes`."""
    return {key: encoded for key, (_, encoded) in self._load_with_bytes(composite).items()}

  def _load_with_bytes(self, composite: Composite) -> dict[str, tuple[np.ndarray, bytes]]:
    """Decodes and checks an example; keeps each file's own bytes when they already decode to
    the stored format (the original's JPEGs: no re-encoding loss, and a tenth of a PNG's size)."""
    bg, bg_bytes = self._background(composite)
    fg_bg_bytes = self.read_bytes(composite.fg_bg)
    fg_bg_image = self._decode(composite.fg_bg, fg_bg_bytes)
    mask_bytes = self.read_bytes(composite.mask)
    mask_image = self._decode(composite.mask, mask_bytes)
    depth_image = self._decode(composite.depth, self.read_bytes(composite.depth))
    fg_bg = _rgb(fg_bg_image)
    mask = np.asarray(_gray(mask_image))[..., None]
    depth = _depth_code(depth_image, composite.depth)

    height, width = fg_bg.shape[:2]
    for ref, array in ((composite.bg, bg), (composite.mask, mask), (composite.depth, depth)):
      if array.shape[:2] != (height, width):
        raise BadExampleError(
            f"{composite.fg_bg}: size {width}x{height} but its partner {ref} is "
            f"{array.shape[1]}x{array.shape[0]}")
    return {
        "bg": (bg, bg_bytes),
        "fg_bg": (fg_bg, fg_bg_bytes if _is_stored_format(fg_bg_image, "RGB")
                  else encode_png(fg_bg)),
        "mask": (mask, mask_bytes if _is_stored_format(mask_image, "L") else encode_png(mask)),
        "depth": (depth, encode_png(depth)),
    }

  def encoded_examples(self, composites: Sequence[Composite]
                       ) -> Iterator[tuple[Composite, dict[str, bytes]]]:
    """Yields (composite, encoded images), skipping bad examples when `skip_bad` is set."""
    num_skipped = 0
    for composite in composites:
      try:
        yield composite, self.encoded(composite)
      except BadExampleError as exc:
        if not self.skip_bad:
          raise BadExampleError(f"{exc}; {_SKIP_HINT}") from exc
        num_skipped += 1
        self._skip([(str(composite.fg_bg), str(exc))])
    if num_skipped:
      logging.warning("%s: skipped %d of %d examples with unreadable or mismatched images.",
                      self.root, num_skipped, len(composites))


def split_composites(composites: Sequence[Composite], kind: str, test_fraction: float,
                     seed: int) -> dict[str, list[Composite]]:
  """Splits into train and test, each ordered by a seeded hash of the composites' names (so any
  prefix is a sample).

  kind="image": the original's split, each composite drawn by a hash of its name (test shares
  backgrounds and cut-outs with train); kind="background": whole backgrounds held out, each by a
  hash of its file name. A composite's split depends on its own name (or its background's), the
  seed and the fraction, not on the other files: adding, moving or copying files moves no
  composite from one split to the other. So the fraction is met on average, not exactly; only a
  split that would leave a side empty takes the one unit (composite or background) whose hash
  is nearest that side.
  """
  if kind not in SPLIT_KINDS:
    raise errors.UserError(f"config.data.original_layout.split={kind!r}: expected one of "
                           f"{SPLIT_KINDS}")
  if not 0.0 < test_fraction < 1.0:
    raise errors.UserError(f"config.data.original_layout.test_fraction={test_fraction}: expected "
                           "a value strictly between 0 and 1")
  def unit(composite: Composite) -> str:
    return composite.key if kind == "image" else composite.bg.name

  key_hashes = {c.key: _unit_hash(seed, c.key) for c in composites}
  hashes = key_hashes if kind == "image" else {c.bg.name: _unit_hash(seed, c.bg.name)
                                               for c in composites}
  if kind == "background" and len(hashes) < 2:
    raise errors.UserError(f"split=background needs at least 2 backgrounds in use, got "
                           f"{len(hashes)}")
  held_out = {name for name, value in hashes.items() if value < test_fraction}
  if len(hashes) >= 2 and not held_out:
    held_out = {min(hashes, key=hashes.get)}
  if len(hashes) >= 2 and len(held_out) == len(hashes):
    held_out.discard(max(hashes, key=hashes.get))
  ordered = sorted(composites, key=lambda c: (key_hashes[c.key], c.key))
  return {"train": [c for c in ordered if unit(c) not in held_out],
          "test": [c for c in ordered if unit(c) in held_out]}


def _unit_hash(seed: int, name: str) -> float:
  """A number in [0, 1) drawn from `name` alone (and the seed): the same on every machine."""
  digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


@functools.lru_cache(maxsize=16)
def scan(root: str, layout_json: str) -> tuple[tuple[str, str], ...]:
  """(composite name, background file name) of each composite the layout (a
  `config.data.original_layout` as JSON) pairs at `root`, in name order: what a dataset is,
  whichever folder or zips hold it and whenever they were written. Computed once per process
  (it lists every folder: 400k names)."""
  with OriginalLayout(root, ml_collections.ConfigDict(json.loads(layout_json))) as layout:
    return tuple((c.key, c.bg.name) for c in layout.composites)


def composites_digest(names: Sequence[tuple[str, str]]) -> str:
  """A short hash of `scan`'s names: equal for the same composites on the same backgrounds."""
  return hashlib.sha256("\n".join(f"{key}\t{bg}" for key, bg in names).encode()).hexdigest()[:10]


def encode_png(array: np.ndarray) -> bytes:
  """PNG bytes of a (H, W, C) uint8 image or a (H, W, 1) uint16 one."""
  image = array[..., 0] if array.shape[-1] == 1 else array
  buffer = io.BytesIO()
  # zlib level 1, not Pillow's 6: a third of the encoding time, files 15 % larger, the same
  # pixels (PNG is lossless). Encoding was 15 % of the synthetic data build.
  Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def _index_folders(root: str, names: Sequence[str]) -> dict[str, dict[str, FileRef]]:
  """Maps each folder name to {file name: where it is}, from unpacked folders or zips."""
  if not os.path.exists(root):
    raise errors.UserError(f"config.data.dir={root!r} does not exist")
  wanted = set(names)
  found: dict[str, dict[str, FileRef]] = {name: {} for name in names}
  if os.path.isdir(root):
    for name in names:
      folder = os.path.join(root, name)
      if os.path.isdir(folder):
        wanted.discard(name)
        found[name] = {f: FileRef(os.path.join(folder, f)) for f in os.listdir(folder)
                       if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))}
    archives = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".zip"))
  else:
    archives = [root]
  sources: dict[str, str] = {}  # Folder name -> the first zip it was found in.
  for archive in archives if wanted else []:
    for folder, file_name, ref in _zip_members(archive, wanted):
      previous = found[folder].get(file_name)
      if previous is not None:
        raise errors.UserError(f"{folder}/{file_name} is in both {previous} and {ref}")
      found[folder][file_name] = ref
      sources.setdefault(folder, archive)
  for name in names:
    if not found[name]:
      raise errors.UserError(f"{root}: no folder {name!r} with files, neither unpacked nor inside "
                             "a zip (folder names come from config.data.original_layout.*_dir)")
  return found


def _zip_members(archive: str, folders: set[str]) -> Iterator[tuple[str, str, FileRef]]:
  """(folder, file name, ref) of the files in `archive` that lie in one of `folders`; a file at
  the top of `NAME.zip` lies in folder NAME."""
  stem = os.path.splitext(os.path.basename(archive))[0]
  try:
    with zipfile.ZipFile(archive) as opened:
      members = opened.namelist()
  except (OSError, zipfile.BadZipFile) as exc:
    raise errors.UserError(f"{archive}: unreadable zip ({_one_line(exc)})") from exc
  for member in members:
    parts = member.split("/")
    if member.endswith("/") or parts[-1].startswith(".") or "__MACOSX" in parts:
      continue
    folder = parts[-2] if len(parts) > 1 else stem
    if folder in folders:
      yield folder, parts[-1], FileRef(archive, member)


def _rgb(image: Image.Image) -> np.ndarray:
  return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def _gray(image: Image.Image) -> Image.Image:
  return image if image.mode == "L" else image.convert("L")


def _depth_code(image: Image.Image, ref: FileRef) -> np.ndarray:
  """The original's 0..255 grayscale depth (0 = nearest) as the uint16 code of d = v / 255;
  16-bit images (PNG) are taken as codes already. Values no code holds are refused, not
  wrapped or truncated."""
  if image.mode == "F":  # 32-bit float (TIFF): no scale says what the values mean.
    raise BadExampleError(f"{ref}: floating-point depth (mode F) is not read; store 8-bit "
                          "(0..255) or 16-bit (0..65535) grayscale")
  if image.mode.startswith("I"):  # 16-bit codes, or 32-bit integers ("I") that must fit them.
    values = np.asarray(image)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > schema.DEPTH_MAX_CODE:
      raise BadExampleError(f"{ref}: depth values {low}..{high} do not fit 16 bits "
                            f"(0..{schema.DEPTH_MAX_CODE})")
    return values.astype(np.uint16)[..., None]
  values = np.asarray(_gray(image), dtype=np.uint16)
  # 65535 / 255 = 257 exactly, so round(v / 255 * DEPTH_MAX_CODE) is an integer product.
  return (values * (schema.DEPTH_MAX_CODE // 255))[..., None]


def _is_stored_format(image: Image.Image, mode: str) -> bool:
  return image.format in ("JPEG", "PNG") and image.mode == mode


def _one_line(exc: BaseException) -> str:
  return " ".join(str(exc).split()) or type(exc).__name__
