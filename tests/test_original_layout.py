"""The original-layout reader on tiny layouts written here: folders, zips, pairing, refusals,
splits, and the TFDS dataset built from it."""

import glob
import io
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from dmjax import config as config_lib
from dmjax.data import original_layout, pipeline, sources, tfds_builder

SIZE = 24
# Named so that sorting differs from writing order: bg number 1 is "attic", not "kitchen".
BACKGROUNDS = {"kitchen.jpg": (200, 60, 40), "attic.jpg": (40, 180, 60),
               "bedroom.jpg": (50, 70, 210)}
SORTED_COLORS = [BACKGROUNDS[name] for name in sorted(BACKGROUNDS)]
NUM_FG, NUM_PLACEMENTS = 2, 2
NUM_COMPOSITES = len(BACKGROUNDS) * NUM_FG * NUM_PLACEMENTS


def jpeg(array, quality=95):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def composite_name(bg, fg, i, prefix="bgfg"):
  return f"{prefix}_b{bg:03d}_f{fg:03d}_{i}.jpg"


def layout_files():
  """{folder: {file name: bytes}} of a 3 backgrounds × 2 objects × 2 placements layout."""
  files = {"bg": {}, "bg_fg": {}, "mask": {}, "depth": {}}
  for name, color in BACKGROUNDS.items():
    files["bg"][name] = jpeg(np.full((SIZE, SIZE, 3), color, np.uint8))
  for bg in range(1, len(BACKGROUNDS) + 1):
    for fg in range(1, NUM_FG + 1):
      for i in range(NUM_PLACEMENTS):
        top, left = 2 + 8 * i, 3 + 6 * fg
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[top:top + 8, left:left + 8] = 255
        image = np.full((SIZE, SIZE, 3), SORTED_COLORS[bg - 1], np.uint8)
        image[mask > 0] = (250, 250, 250)
        depth = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
        files["bg_fg"][composite_name(bg, fg, i)] = jpeg(image)
        files["mask"][composite_name(bg, fg, i, "mask")] = jpeg(mask)
        files["depth"][composite_name(bg, fg, i, "densedepth")] = jpeg(depth, quality=75)
  return files


def write_folders(root, files):
  for folder, contents in files.items():
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for name, data in contents.items():
      with open(os.path.join(root, folder, name), "wb") as f:
        f.write(data)
  return str(root)


def write_zips(root, files):
  """bg.zip holds bg/…, bg_fg.zip holds the files themselves, labels.zip holds two folders."""
  os.makedirs(root, exist_ok=True)
  with zipfile.ZipFile(os.path.join(root, "bg.zip"), "w") as archive:
    for name, data in files["bg"].items():
      archive.writestr(f"bg/{name}", data)
  with zipfile.ZipFile(os.path.join(root, "bg_fg.zip"), "w") as archive:
    for name, data in files["bg_fg"].items():
      archive.writestr(name, data)
  with zipfile.ZipFile(os.path.join(root, "labels.zip"), "w") as archive:
    archive.writestr("__MACOSX/mask/._junk", b"")
    for folder in ("mask", "depth"):
      for name, data in files[folder].items():
        archive.writestr(f"export/{folder}/{name}", data)
  return str(root)


def write_single_zip(root, files):
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "seed.zip")
  with zipfile.ZipFile(path, "w") as archive:
    for folder, contents in files.items():
      for name, data in contents.items():
        archive.writestr(f"seed/{folder}/{name}", data)
  return path


WRITERS = {"folders": write_folders, "zips": write_zips, "single_zip": write_single_zip}


def layout_config(**overrides):
  layout = config_lib.base_config().data.original_layout
  layout.update(overrides)
  return layout


@pytest.fixture
def folder_root(tmp_path):
  return write_folders(tmp_path / "seed", layout_files())


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_pairs_by_name_with_the_sorted_background(kind, tmp_path):
  root = WRITERS[kind](tmp_path / "seed", layout_files())
  with original_layout.OriginalLayout(root, layout_config()) as layout:
    assert len(layout.composites) == NUM_COMPOSITES and layout.num_backgrounds == 3
    for composite in layout.composites:
      bg_number = int(composite.key.split("_")[1][1:])
      assert composite.bg_index == bg_number - 1
      assert composite.bg.name == sorted(BACKGROUNDS)[bg_number - 1]
      assert composite.mask.name == composite.key.replace("bgfg", "mask")
      assert composite.depth.name == composite.key.replace("bgfg", "densedepth")
      example = layout.load(composite)
      color = np.array(SORTED_COLORS[bg_number - 1])
      assert np.abs(example["bg"].reshape(-1, 3).mean(0) - color).max() < 3
      outside = example["fg_bg"][example["mask"][..., 0] < 128]
      assert np.abs(np.median(outside, axis=0) - color).max() < 4
      assert example["bg"].dtype == example["fg_bg"].dtype == example["mask"].dtype == np.uint8
      assert example["mask"].shape == example["depth"].shape == (SIZE, SIZE, 1)
      assert example["depth"].dtype == np.uint16
      assert np.all(example["depth"] % 257 == 0)  # d = v / 255 exactly.
      assert example["depth"][0, 0, 0] < example["depth"][0, -1, 0]  # 0 = nearest, kept.


def break_layout(root, what):
  """Introduces one problem into a folder layout; returns the file an error must name."""
  name = composite_name(2, 1, 1)
  if what == "missing mask":
    os.remove(os.path.join(root, "mask", composite_name(2, 1, 1, "mask")))
  elif what == "missing depth":
    os.remove(os.path.join(root, "depth", composite_name(2, 1, 1, "densedepth")))
  elif what == "corrupt jpeg":
    path = os.path.join(root, "bg_fg", name)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 3])
  elif what == "mismatched size":
    with open(os.path.join(root, "mask", composite_name(2, 1, 1, "mask")), "wb") as f:
      f.write(jpeg(np.zeros((SIZE - 4, SIZE), np.uint8)))
  elif what == "bg out of range":
    name = composite_name(4, 1, 0)
    files = layout_files()
    for folder, prefix in (("bg_fg", "bgfg"), ("mask", "mask"), ("depth", "densedepth")):
      with open(os.path.join(root, folder, composite_name(4, 1, 0, prefix)), "wb") as f:
        f.write(files[folder][composite_name(1, 1, 0, prefix)])
  return name


PROBLEMS = {
    "missing mask": r"missing mask partner mask/mask_b002_f001_1\.jpg",
    "missing depth": r"missing depth partner depth/densedepth_b002_f001_1\.jpg",
    "corrupt jpeg": r"unreadable image",
    "mismatched size": r"size 24x24 but its partner .*mask_b002_f001_1\.jpg is 24x20",
    "bg out of range": r"bg number 004 is out of range: bg/ has 3 images",
}


@pytest.mark.parametrize("what", sorted(PROBLEMS))
def test_bad_examples_are_refused_naming_the_file(what, folder_root):
  name = break_layout(folder_root, what)
  with pytest.raises(ValueError) as raised:
    with original_layout.OriginalLayout(folder_root, layout_config()) as layout:
      list(layout.encoded_examples(layout.composites))
  message = str(raised.value)
  assert "\n" not in message
  assert name in message and "skip_bad" in message
  assert raised.match(PROBLEMS[what])


def test_skip_bad_counts_and_lists_the_bad_examples(folder_root):
  broken = [break_layout(folder_root, what) for what in ("bg out of range", "corrupt jpeg")]
  os.remove(os.path.join(folder_root, "depth", composite_name(3, 2, 0, "densedepth")))
  broken.append(composite_name(3, 2, 0))
  with original_layout.OriginalLayout(folder_root, layout_config(skip_bad=True)) as layout:
    assert len(layout.composites) == NUM_COMPOSITES - 1  # Partner problems: found by name.
    assert len(layout.skipped) == 2
    kept = [c.key for c, _ in layout.encoded_examples(layout.composites)]
    assert len(kept) == NUM_COMPOSITES - 2
    skipped_files = [os.path.basename(file) for file, _ in layout.skipped]
    assert sorted(skipped_files) == sorted(broken)
    assert not set(kept) & set(broken)


def tiff(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="TIFF")
  return buffer.getvalue()


# Depth maps no 16-bit code holds: 32-bit integers past 65535 or below 0 (which a cast would
# wrap), and floats (which a conversion to 8 bits would truncate).
BAD_DEPTH = {
    "int32 over 16 bits": (np.full((SIZE, SIZE), 70_000, np.int32), r"depth values 70000\.\.70000"),
    "negative int32": (np.full((SIZE, SIZE), -3, np.int32), r"depth values -3\.\.-3"),
    "float": (np.full((SIZE, SIZE), 0.5, np.float32), "floating-point depth"),
}


@pytest.mark.parametrize("what", sorted(BAD_DEPTH))
def test_depth_values_that_do_not_fit_16_bits_are_refused(what, folder_root):
  array, message = BAD_DEPTH[what]
  name = composite_name(1, 2, 1, "densedepth")
  with open(os.path.join(folder_root, "depth", name), "wb") as f:
    f.write(tiff(array))
  with original_layout.OriginalLayout(folder_root, layout_config()) as layout:
    composite = next(c for c in layout.composites if c.depth.name == name)
    with pytest.raises(ValueError, match=f"{name}: {message}") as raised:
      layout.load(composite)
  assert "\n" not in str(raised.value)
  # In range, a 32-bit integer image is read as the codes it holds.
  codes = np.tile(np.linspace(0, 65535, SIZE).astype(np.int32), (SIZE, 1))
  with open(os.path.join(folder_root, "depth", name), "wb") as f:
    f.write(tiff(codes))
  with original_layout.OriginalLayout(folder_root, layout_config()) as layout:
    composite = next(c for c in layout.composites if c.depth.name == name)
    np.testing.assert_array_equal(layout.load(composite)["depth"][..., 0], codes)


def test_a_decompression_bomb_is_a_bad_example(folder_root, monkeypatch):
  # Pillow's bound scaled down: the 24-px images pass, a 40-px mask (1,600 pixels) is a bomb.
  # Its error is not an OSError, and used to escape skip_bad with a traceback.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
  bomb = composite_name(3, 1, 0, "mask")
  with open(os.path.join(folder_root, "mask", bomb), "wb") as f:
    f.write(jpeg(np.zeros((40, 40), np.uint8)))
  with original_layout.OriginalLayout(folder_root, layout_config()) as layout:
    with pytest.raises(ValueError, match=f"{bomb}.*skip_bad") as raised:
      list(layout.encoded_examples(layout.composites))
    assert "\n" not in str(raised.value)
  with original_layout.OriginalLayout(folder_root, layout_config(skip_bad=True)) as layout:
    kept = [c.key for c, _ in layout.encoded_examples(layout.composites)]
    assert len(kept) == NUM_COMPOSITES - 1 and composite_name(3, 1, 0) not in kept
    assert [os.path.basename(file) for file, _ in layout.skipped] == [composite_name(3, 1, 0)]


def rewrite_zip_member(path, member, data, compression=zipfile.ZIP_DEFLATED):
  """`path` again with `member`'s bytes replaced."""
  with zipfile.ZipFile(path) as archive:
    contents = {name: archive.read(name) for name in archive.namelist()}
  contents[member] = data
  with zipfile.ZipFile(path, "w", compression) as archive:
    for name, value in contents.items():
      archive.writestr(name, value)


def test_zip_members_are_read_within_a_size_limit(tmp_path):
  root = write_zips(tmp_path / "seed", layout_files())
  name = composite_name(2, 2, 0)
  # A zip bomb: 4 MiB of zeros in a few kB, honestly declared; refused from its header.
  rewrite_zip_member(os.path.join(root, "bg_fg.zip"), name, bytes(4 << 20))
  assert os.path.getsize(os.path.join(root, "bg_fg.zip")) < 64 << 10
  with original_layout.OriginalLayout(root, layout_config(), max_file_bytes=1 << 20) as layout:
    with pytest.raises(ValueError, match=rf"bg_fg\.zip:{name}: 4,194,304 bytes, over the limit "
                       r"of 1,048,576 for one file.*skip_bad"):
      list(layout.encoded_examples(layout.composites))
  with original_layout.OriginalLayout(root, layout_config(skip_bad=True),
                                      max_file_bytes=1 << 20) as layout:
    kept = [c.key for c, _ in layout.encoded_examples(layout.composites)]
    assert len(kept) == NUM_COMPOSITES - 1 and name not in kept


def test_a_zip_member_that_lies_about_its_size_is_a_bad_example(tmp_path):
  root = write_zips(tmp_path / "seed", layout_files())
  name = composite_name(1, 1, 1, "mask")
  labels = os.path.join(root, "labels.zip")
  rewrite_zip_member(labels, f"export/mask/{name}", bytes(100_000))
  # Its headers (local and central) say 1,000 bytes: no more is read, and the CRC then fails.
  with zipfile.ZipFile(labels) as archive:
    info = archive.getinfo(f"export/mask/{name}")
  data = bytearray(open(labels, "rb").read())
  for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
    start = -1
    while (start := data.find(signature, start + 1)) >= 0:
      if int.from_bytes(data[start + offset:start + offset + 4], "little") == info.file_size:
        data[start + offset:start + offset + 4] = (1000).to_bytes(4, "little")
  open(labels, "wb").write(bytes(data))
  with original_layout.OriginalLayout(root, layout_config(skip_bad=True)) as layout:
    kept = [c.key for c, _ in layout.encoded_examples(layout.composites)]
  assert len(kept) == NUM_COMPOSITES - 1 and composite_name(1, 1, 1) not in kept
  assert "Bad CRC-32" in layout.skipped[0][1] and name in layout.skipped[0][1]


def test_image_split_is_reproducible_and_disjoint(folder_root):
  with original_layout.OriginalLayout(folder_root, layout_config()) as layout:
    composites = layout.composites
  split = original_layout.split_composites(composites, "image", 0.3, seed=0)
  again = original_layout.split_composites(composites, "image", 0.3, seed=0)
  assert split == again
  train, test = ({c.key for c in split[s]} for s in ("train", "test"))
  assert test and train and not train & test
  assert train | test == {c.key for c in composites}
  others = [{c.key for c in
             original_layout.split_composites(composites, "image", 0.3, seed=s)["test"]}
            for s in range(1, 4)]
  assert any(other != test for other in others)
  # Image-level: the test set shares backgrounds with training (the original's leak).
  assert {c.bg_index for c in split["test"]} & {c.bg_index for c in split["train"]}


def fake_composites(indices, folder="data"):
  """Composites by name only (nothing is read), composite i on background i % 10, or for i from
  1000 on one of 3 more backgrounds; files under `folder`."""
  def ref(path):
    return original_layout.FileRef(f"/{folder}/{path}")

  composites = []
  for i in indices:
    bg = i % 10 if i < 1000 else 10 + i % 3
    composites.append(original_layout.Composite(
        key=composite_name(bg + 1, i, 0), bg_index=bg, fg_bg=ref(f"bg_fg/{i}.jpg"),
        mask=ref(f"mask/{i}.jpg"), depth=ref(f"depth/{i}.jpg"), bg=ref(f"bg/{bg:03d}.jpg")))
  return composites


@pytest.mark.parametrize("kind", original_layout.SPLIT_KINDS)
def test_a_composite_keeps_its_split_when_files_are_added_moved_or_copied(kind):
  before = original_layout.split_composites(fake_composites(range(1000)), kind, 0.3, seed=0)
  # 100 composites more (on 3 new backgrounds and the old ones), every file somewhere else.
  after = original_layout.split_composites(fake_composites(range(1100), folder="copy"), kind,
                                           0.3, seed=0)
  split_of = {c.key: name for name, split in after.items() for c in split}
  for name, split in before.items():
    assert {split_of[c.key] for c in split} == {name}
    # And in the same order: the first N test composites stay a sample of the old ones.
    keys = {c.key for c in split}
    assert [c.key for c in after[name] if c.key in keys] == [c.key for c in split]
  if kind == "image":
    test_fraction = len(before["test"]) / 1000
    assert 0.25 < test_fraction < 0.35, test_fraction  # 0.3 on average: by hash, not by count.


def test_background_split_holds_out_whole_backgrounds(folder_root):
  with original_layout.OriginalLayout(folder_root, layout_config()) as layout:
    split = original_layout.split_composites(layout.composites, "background", 0.3, seed=0)
  train_bgs = {c.bg_index for c in split["train"]}
  test_bgs = {c.bg_index for c in split["test"]}
  assert len(test_bgs) == 1 and not train_bgs & test_bgs and train_bgs | test_bgs == {0, 1, 2}
  assert len(split["test"]) == NUM_FG * NUM_PLACEMENTS


def test_split_settings_are_checked():
  with pytest.raises(ValueError, match="original_layout.split='bg'"):
    original_layout.split_composites([], "bg", 0.3, seed=0)
  with pytest.raises(ValueError, match="test_fraction=1.5"):
    original_layout.split_composites([], "image", 1.5, seed=0)


def test_missing_folder_is_named(tmp_path):
  files = layout_files()
  del files["depth"]
  root = write_folders(tmp_path / "seed", files)
  with pytest.raises(ValueError, match="no folder 'depth'"):
    original_layout.OriginalLayout(root, layout_config())


def original_config(data_dir, tfds_dir, **layout_overrides):
  config = config_lib.base_config()
  config.data.source = "original"
  config.data.dir = str(data_dir)
  config.data.tfds_dir = str(tfds_dir)
  config.data.resolution = 16
  config.data.original_layout.update(layout_overrides)
  config.eval_batch_size = 4
  return config


@pytest.mark.parametrize("kind", ["folders", "single_zip"])
def test_tfds_dataset_built_from_the_layout_reads_back(kind, tmp_path):
  files = layout_files()
  root = WRITERS[kind](tmp_path / "seed", files)
  config = original_config(root, tmp_path / "tfds")
  pipeline.prepare(config)

  with original_layout.OriginalLayout(root, config.data.original_layout) as layout:
    splits = original_layout.split_composites(layout.composites, "image", 0.3, seed=0)
    expected = splits["test"]
    source = sources.get_source(config)
    # Each split's composites, in order, recorded with the dataset.
    assert tfds_builder.built_composites(source.builder) == {
        name: [c.key for c in split] for name, split in splits.items()}
    assert pipeline.num_examples(config, "train") == len(splits["train"]) == 9
    assert pipeline.num_examples(config, "test") == len(expected) == 3
    data_source = source.builder.as_data_source("test", decoders=tfds_builder.RAW_DECODERS)
    for index, composite in enumerate(expected):
      raw = data_source[index]
      assert raw["fg_bg"] == files["bg_fg"][composite.key]  # The original's JPEG bytes, kept.
      stored, loaded = tfds_builder.decode_example(raw), layout.load(composite)
      for key in loaded:
        np.testing.assert_array_equal(stored[key], loaded[key], err_msg=key)

  batch = next(pipeline.create_eval_batches(config, "test"))
  assert batch["fg_bg"].shape == (4, 16, 16, 3) and batch["depth"].shape == (4, 16, 16, 1)
  assert list(batch["example_weight"]) == [1, 1, 1, 0]
  stored = next(pipeline.create_train_iterator(config))["mask"]  # The step resizes it.
  assert stored.shape == (32, SIZE, SIZE, 1) and stored.dtype == np.uint8


def dataset_name(config):
  original_layout.scan.cache_clear()  # What a new process would see.
  return sources.get_source(config).name


def test_dataset_names_keep_settings_apart(tmp_path):
  a = write_folders(tmp_path / "a", layout_files())
  b = write_folders(tmp_path / "b", layout_files())
  os.remove(os.path.join(b, "bg_fg", composite_name(3, 2, 1)))  # One composite fewer.
  settings = [(a, {}), (b, {}), (a, {"split": "background"}), (a, {"test_fraction": 0.25}),
              (a, {"mask_dir": "depth", "mask_pattern": "densedepth_b{bg}_f{fg}_{i}.jpg"}),
              (a, {"split_seed": 1})]
  names = {dataset_name(original_config(d, tmp_path, **o)) for d, o in settings}
  assert len(names) == 6


def test_the_training_seed_keeps_the_split_and_the_built_dataset(folder_root, tmp_path):
  config = original_config(folder_root, tmp_path / "tfds")
  other_training_seed = original_config(folder_root, tmp_path / "tfds")
  other_training_seed.seed = 1
  assert dataset_name(other_training_seed) == dataset_name(config)
  pipeline.prepare(config)
  test_keys = sorted(raw["fg_bg"] for raw in sources.get_source(other_training_seed)
                     .builder.as_data_source("test", decoders=tfds_builder.RAW_DECODERS))
  with original_layout.OriginalLayout(folder_root, config.data.original_layout) as layout:
    expected = original_layout.split_composites(layout.composites, "image", 0.3, seed=0)["test"]
    assert test_keys == sorted(layout.read_bytes(c.fg_bg) for c in expected)


def test_dataset_name_follows_the_composites_not_the_folder(tmp_path, monkeypatch):
  config = original_config(write_folders(tmp_path / "here" / "seed", layout_files()),
                           tmp_path / "tfds")
  name = dataset_name(config)
  # The same composites elsewhere: a copy, another node's own copy as zips, a relative path.
  copy = write_folders(tmp_path / "copy", layout_files())
  zips = write_zips(tmp_path / "zips", layout_files())
  monkeypatch.chdir(tmp_path / "here")
  for data_dir in (copy, zips, "seed"):
    assert dataset_name(copy_config(config, data_dir)) == name, data_dir
  # A file rewritten (a newer time), or something beside the four folders: the same composites.
  mask = sorted(glob.glob(str(tmp_path / "here" / "seed" / "mask" / "*")))[0]
  os.utime(mask, ns=(2 * 10**18, 2 * 10**18))
  (tmp_path / "here" / "seed" / "notes.txt").write_text("not part of the layout")
  assert dataset_name(config) == name
  # A composite added, or one gone: another dataset.
  add_composites(config.data.dir, fg=3)
  added = dataset_name(config)
  os.remove(os.path.join(config.data.dir, "bg_fg", composite_name(1, 1, 0)))
  assert len({name, added, dataset_name(config)}) == 3


def copy_config(config, data_dir):
  config = config.copy_and_resolve_references()
  config.data.dir = str(data_dir)
  return config


def add_composites(root, fg):
  """Object `fg` at both placements over every background, in a folder layout: 6 composites,
  copies of object 1's files; returns their names."""
  files = layout_files()
  for bg in range(1, len(BACKGROUNDS) + 1):
    for i in range(NUM_PLACEMENTS):
      for folder, prefix in (("bg_fg", "bgfg"), ("mask", "mask"), ("depth", "densedepth")):
        with open(os.path.join(root, folder, composite_name(bg, fg, i, prefix)), "wb") as f:
          f.write(files[folder][composite_name(bg, 1, i, prefix)])
  return [composite_name(bg, fg, i) for bg in range(1, len(BACKGROUNDS) + 1)
          for i in range(NUM_PLACEMENTS)]


def test_a_copy_of_the_data_continues_the_training_stream(tmp_path):
  config = original_config(write_folders(tmp_path / "seed", layout_files()), tmp_path / "tfds")
  pipeline.prepare(config)
  iterator = pipeline.create_train_iterator(config)
  next(iterator)
  state = iterator.get_state()
  # Another node, with its own copy of the folder (new file times) and of the built data.
  node = tmp_path / "node2"
  shutil.copytree(tmp_path / "seed", node / "seed", copy_function=shutil.copy)
  shutil.copytree(tmp_path / "tfds", node / "tfds")
  other = original_config(node / "seed", node / "tfds")
  original_layout.scan.cache_clear()
  pipeline.prepare(other)
  resumed = pipeline.create_train_iterator(other)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["fg_bg"], next(iterator)["fg_bg"])
  # A composite added there: another dataset, refused with what to do.
  add_composites(node / "seed", fg=3)
  original_layout.scan.cache_clear()
  pipeline.prepare(other)
  with pytest.raises(ValueError, match="different stream .*composites are not those the run "
                     "trained on"):
    pipeline.create_train_iterator(other).set_state(state)


def test_building_refuses_a_bad_layout(folder_root, tmp_path):
  break_layout(folder_root, "mismatched size")
  config = original_config(folder_root, tmp_path / "tfds")
  with pytest.raises(ValueError, match="mask_b002_f001_1.jpg"):
    pipeline.prepare(config)
  shutil.rmtree(tmp_path / "tfds")
  config.data.original_layout.skip_bad = True
  pipeline.prepare(config)
  assert (pipeline.num_examples(config, "train") + pipeline.num_examples(config, "test")
          == NUM_COMPOSITES - 1)
