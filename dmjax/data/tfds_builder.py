"""TFDS builders that store the synthetic scenes and the original layout as ArrayRecord files.

Every image is stored encoded, and encoded here with PIL: PNG for rendered scenes and for depth,
the original dataset's own JPEG bytes where they already decode to the stored format. So neither
building nor reading needs TensorFlow. Readers ask TFDS for the raw bytes (`RAW_DECODERS`) and
decode with `decode_example`, because TFDS decodes uint16 PNGs with NumPy only through OpenCV;
PIL also makes the decoded pixels the same on every machine.

Config names encode every setting that changes the data, so different settings never share a
directory: `dmjax_synthetic/r80_n12000_t1000_s0`, `dmjax_seed/image_t30_s0_k<hash of the layout
settings and of the composites' names>` (the original layout's datasets keep the directory name
they had when the original system was called "seed"). The original layout's name depends on the
composites a folder holds, not on where the folder is or when its files were written: a copy,
another node's own copy or a re-unzipped folder is the same dataset; a composite added or gone
makes another. Names without the `k` are of datasets built before splits were drawn by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from dmjax import errors, image_decode, progress
from dmjax.data import original_layout, schema, synthetic

SPLITS = ("train", "test")
COMPOSITES_KEY = "composites"  # In an original-layout dataset's metadata: see DmjaxOriginal.
RAW_DECODERS = {key: tfds.decode.SkipDecoding() for key in schema.KEYS}

# Below this many examples per process, starting the processes costs more than it saves.
_MIN_EXAMPLES_PER_PROCESS = 256
_CITATION = "dmjax: foreground mask and dense depth from a (background, composite) photo pair."


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "bg": tfds.features.Image(shape=(None, None, 3), doc="The background photo."),
      "fg_bg": tfds.features.Image(shape=(None, None, 3),
                                   doc="The composite: an object over the same background."),
      "mask": tfds.features.Image(shape=(None, None, 1), doc="The object's alpha, 0..255."),
      "depth": tfds.features.Image(
          shape=(None, None, 1), dtype=np.uint16, encoding_format="png",
          doc="Depth d in [0, 1] as round(d * 65535); 0 = nearest (dmjax.data.schema)."),
  })


def encode_example(example: dict[str, np.ndarray]) -> dict[str, bytes]:
  """A stored-format example (dmjax.data.schema) as PNG bytes per image."""
  return {key: original_layout.encode_png(example[key]) for key in schema.KEYS}


def decode_example(encoded: dict[str, bytes]) -> dict[str, np.ndarray]:
  """Raw bytes from the data source back to the stored format of dmjax.data.schema."""
  out = {}
  for key in schema.KEYS:
    with image_decode.opened(encoded[key], key) as image:
      if key in schema.IMAGE_KEYS:
        out[key] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
      elif key == "mask":
        out[key] = np.asarray(image if image.mode == "L" else image.convert("L"))[..., None]
      else:
        out[key] = np.asarray(image).astype(np.uint16, copy=False)[..., None]
  return out


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """The rendered scenes of `dmjax.data.synthetic` at one setting."""

  resolution: int = 80
  num_train: int = 12_000
  num_test: int = 1_000
  scene_seed: int = 0

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> SyntheticConfig:
    settings = data_config.synthetic
    name = (f"r{settings.resolution}_n{settings.num_train}_t{settings.num_test}"
            f"_s{settings.seed}")
    return cls(name=name, resolution=int(settings.resolution),
               num_train=int(settings.num_train), num_test=int(settings.num_test),
               scene_seed=int(settings.seed),
               description=f"Synthetic scenes rendered at {settings.resolution} px.")


class DmjaxSynthetic(tfds.core.GeneratorBasedBuilder):
  """Synthetic (bg, fg_bg, mask, depth) scenes; example k of a split is
  `synthetic.render_example(split, k)`, stored in that order."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "A quarter of the scenes are close-ups (objects up to ~45 % of the "
                            "frame); renders above 830 px."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=_features(), disable_shuffling=True,
                                          citation=_CITATION)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test)}

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    tasks = ((split, index, config.resolution, config.scene_seed) for index in range(num_examples))
    num_processes = min(len(os.sched_getaffinity(0)), num_examples // _MIN_EXAMPLES_PER_PROCESS)
    what = f"render {split}"
    if num_processes <= 1:
      yield from enumerate(progress.track(map(_render_encoded, tasks), what, num_examples,
                                          unit="scenes"))
      return
    # Rendering is the slow part of a build (hours for the full-sized set on one core). Spawned,
    # not forked: the parent may already run JAX or TensorFlow threads.
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
      yield from enumerate(progress.track(pool.imap(_render_encoded, tasks, chunksize=8), what,
                                          num_examples, unit="scenes"))


def _render_encoded(task: tuple[str, int, int, int]) -> dict[str, bytes]:
  split, index, resolution, seed = task
  return encode_example(synthetic.render_example(split, index, resolution=resolution, seed=seed))


@dataclasses.dataclass
class OriginalConfig(tfds.core.BuilderConfig):
  """The original layout's composites, split one way."""

  split: str = "image"
  test_fraction: float = 0.3
  split_seed: int = 0
  # config.data.original_layout as JSON (a dataclass field must be hashable).
  layout_json: str = "{}"
  root_name: str = ""  # When config.data.dir is a zip: its name inside the manual_dir.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> OriginalConfig:
    """The dataset of the composites in `config.data.dir` now, or the one that
    `config.data.original_layout.dataset_name` names (a run's own, read without the folder)."""
    data = config.data
    layout = data.original_layout
    if not data.dir:
      raise errors.UserError("config.data.source='original' needs config.data.dir: the folder (or "
                             "zip) holding the original layout")
    settings = {k: v for k, v in layout.to_dict().items() if k != "dataset_name"}
    layout_json = json.dumps(settings, sort_keys=True)
    fraction = f"{layout.test_fraction * 100:g}".replace(".", "p")
    # Configs saved before `split_seed` existed split with the training seed.
    split_seed = int(layout.get("split_seed", config.seed))
    where = os.path.realpath(data.dir)
    name = layout.get("dataset_name", "") or (
        f"{layout.split}_t{fraction}_s{split_seed}"
        f"_k{layout_digest(layout_json, original_layout.scan(where, layout_json))}")
    return cls(name=name, split=layout.split, test_fraction=float(layout.test_fraction),
               split_seed=split_seed, layout_json=layout_json,
               root_name=os.path.basename(where) if os.path.isfile(where) else "",
               description=f"The original layout, split by {layout.split}.")

  @property
  def layout(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(self.layout_json))


def layout_digest(layout_json: str, names) -> str:
  """The `k` part of an original-layout dataset's name: its layout settings and composites."""
  composites = original_layout.composites_digest(names)
  return hashlib.sha256(f"{layout_json}\n{composites}".encode()).hexdigest()[:10]


def is_named_by_composites(config_name: str) -> bool:
  """Whether an original-layout dataset (its config name) was built with splits drawn by name."""
  return re.fullmatch(r".*_k[0-9a-f]{10}", config_name) is not None


def original_manual_dir(data_dir: str) -> str:
  """The folder TFDS is told to read by hand: config.data.dir, or the folder of its zip."""
  where = os.path.realpath(data_dir)  # As OriginalConfig names it.
  return os.path.dirname(where) if os.path.isfile(where) else where


class DmjaxOriginal(tfds.core.GeneratorBasedBuilder):
  """The original system's dataset (SPEC §4) in the layout users bring, paired and checked."""

  name = "dmjax_seed"  # Its name before the rename: datasets built then are found as they are.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Set config.data.dir to the folder holding bg/, bg_fg/, mask/ and depth/ (unpacked, or inside
  zips in that folder, or a single zip); folder names and file-name patterns come from
  config.data.original_layout."""

  def _info(self) -> tfds.core.DatasetInfo:
    # The metadata lists the composites of each split as built (`COMPOSITES_KEY`): how an
    # evaluation tells which composites are new since a run trained.
    return self.dataset_info_from_configs(features=_features(), disable_shuffling=True,
                                          citation=_CITATION, metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    config = self.builder_config
    root = os.fspath(dl_manager.manual_dir)
    if config.root_name:
      root = os.path.join(root, config.root_name)
    layout = original_layout.OriginalLayout(root, config.layout)
    names = tuple((c.key, c.bg.name) for c in layout.composites)
    if not config.name.endswith(f"_k{layout_digest(config.layout_json, names)}"):
      raise errors.UserError(f"{root}: its composites are not those of dataset {config.name} "
                             "(changed since this run looked, or named for another folder); "
                             "run again to build the dataset of what is there now")
    splits = original_layout.split_composites(layout.composites, config.split, config.test_fraction,
                                          config.split_seed)
    written = self.info.metadata.setdefault(COMPOSITES_KEY, {})
    return {name: self._generate_examples(layout, composites, written.setdefault(name, []))
            for name, composites in splits.items()}

  def _generate_examples(self, layout: original_layout.OriginalLayout, composites, written):
    for composite, encoded in progress.track(layout.encoded_examples(composites), "read photos",
                                             len(composites), unit="examples"):
      written.append(composite.key)  # Those skip_bad skips are not in the dataset.
      yield composite.key, encoded


def built_composites(builder: tfds.core.DatasetBuilder) -> dict[str, list[str]] | None:
  """{split: names of its composites} of a built original-layout dataset, None for one built
  before datasets recorded them."""
  return builder.info.metadata.get(COMPOSITES_KEY) if builder.info.metadata is not None else None
