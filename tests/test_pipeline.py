"""The grain pipeline over a tiny built synthetic dataset: the stored-format training stream
(determinism, checkpointing, sharding, predecoding), evaluation batches (resize, order, padding),
and reading without TF."""

import glob
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
from conftest import HIDE_TENSORFLOW, copy_of

from dmjax import config as config_lib
from dmjax.data import pipeline, schema, sources, tfds_builder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lookup(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def stored_examples(config, split):
  source = sources.get_source(config)
  data_source = source.builder.as_data_source(split, decoders=tfds_builder.RAW_DECODERS)
  return [tfds_builder.decode_example(data_source[i]) for i in range(len(data_source))]


def example_ids(batches, examples):
  """Which stored example each row of evaluation batches is, by its un-normalised fg_bg (needs no
  resize)."""
  lookup = {example["fg_bg"].tobytes(): i for i, example in enumerate(examples)}
  ids = []
  for batch in batches:
    _, fg_bg = pipeline.denormalize(batch)
    for image in np.round(fg_bg * 255).astype(np.uint8):
      ids.append(lookup[image.tobytes()])
  return ids


def test_training_batches_are_stored_examples(tiny_data_config):
  # The train step augments, resizes and normalises them (dmjax.data.augment).
  batch = next(pipeline.create_train_iterator(tiny_data_config))
  r = tiny_data_config.data.synthetic.resolution  # As rendered: no transfer_resolution.
  assert set(batch) == set(schema.KEYS)
  for key, dtype in (("bg", np.uint8), ("fg_bg", np.uint8), ("mask", np.uint8),
                     ("depth", np.uint16)):
    assert type(batch[key]) is np.ndarray and batch[key].dtype == dtype, key
  assert batch["bg"].shape == batch["fg_bg"].shape == (4, r, r, 3)
  assert batch["mask"].shape == batch["depth"].shape == (4, r, r, 1)
  assert pipeline.num_examples(tiny_data_config, "train") == 24
  assert pipeline.num_examples(tiny_data_config, "test") == 8


def test_same_seed_same_batches_other_seed_other_batches(tiny_data_config):
  first = take(pipeline.create_train_iterator(tiny_data_config), 3)
  assert_same_batches(first, take(pipeline.create_train_iterator(tiny_data_config), 3))
  other = take(pipeline.create_train_iterator(copy_of(tiny_data_config, seed=1)), 3)
  assert not np.array_equal(first[0]["fg_bg"], other[0]["fg_bg"])
  # Nor does augmentation change what the host sends: the step draws it.
  still = copy_of(tiny_data_config, **{"data.augment.enabled": False})
  assert_same_batches(first, take(pipeline.create_train_iterator(still), 3))


def test_zero_and_two_workers_give_identical_batches(tiny_data_config):
  without_workers = take(pipeline.create_train_iterator(tiny_data_config), 8)
  iterator = pipeline.create_train_iterator(copy_of(tiny_data_config, **{"data.num_workers": 2}))
  try:
    with_workers = take(iterator, 8)
  finally:
    iterator.close()
  assert_same_batches(without_workers, with_workers)


def test_state_round_trip_restores_the_next_batches(tiny_data_config, tmp_path):
  iterator = pipeline.create_train_iterator(tiny_data_config)
  take(iterator, 3)
  state = iterator.get_state()
  assert isinstance(state, bytes)
  expected = take(iterator, 4)

  restored = pipeline.create_train_iterator(tiny_data_config)
  restored.set_state(state)
  assert_same_batches(expected, take(restored, 4))

  # The way the trainer saves it: grain's orbax handler, into a worker-backed iterator.
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(tmp_path, item=_Frozen(state))
  with_workers = pipeline.create_train_iterator(
      copy_of(tiny_data_config, **{"data.num_workers": 1}))
  try:
    handler.restore(tmp_path, item=with_workers)
    assert_same_batches(expected, take(with_workers, 4))
  finally:
    with_workers.close()


class _Frozen:

  def __init__(self, state):
    self._state = state

  def get_state(self):
    return self._state


def test_state_from_another_stream_is_refused(tiny_data_config):
  iterator = pipeline.create_train_iterator(tiny_data_config)
  next(iterator)
  other = pipeline.create_train_iterator(copy_of(tiny_data_config, seed=5))
  with pytest.raises(ValueError, match="seed"):
    other.set_state(iterator.get_state())


def test_batch_size_must_divide_among_processes(tiny_data_config):
  with pytest.raises(ValueError, match="config.batch_size=4"):
    pipeline.create_train_iterator(tiny_data_config, process_index=0, process_count=3)


def test_eval_batches_are_in_order_and_padded(tiny_data_config):
  examples = stored_examples(tiny_data_config, "test")
  batches = list(pipeline.create_eval_batches(tiny_data_config, "test", 6))
  assert [b["example_weight"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 1, 0, 0]]
  assert all(b["example_weight"].dtype == np.float32 for b in batches)
  ids = example_ids(batches, examples)
  assert ids == [0, 1, 2, 3, 4, 5, 5, 5]
  for row, example in enumerate(examples[:4]):  # Stored at 32 px: no resize, exact labels.
    np.testing.assert_allclose(batches[0]["depth"][row], example["depth"] / 65535, atol=1e-6)
    np.testing.assert_array_equal(batches[0]["mask"][row], example["mask"] > 127.5)

  everything = list(pipeline.create_eval_batches(tiny_data_config, "test", batch_size=3))
  assert [b["example_weight"].sum() for b in everything] == [3, 3, 2]

  per_process = [list(pipeline.create_eval_batches(tiny_data_config, "test", 6, process_index=p,
                                                   process_count=2)) for p in (0, 1)]
  assert [len(batches) for batches in per_process] == [2, 2]
  assert example_ids(per_process[0], examples) == [0, 1, 4, 5]
  assert [b["example_weight"].tolist() for b in per_process[1]] == [[1, 1], [0, 0]]
  assert example_ids(per_process[1], examples)[:2] == [2, 3]


def test_unknown_source_names_the_key_and_the_known_ones():
  config = config_lib.base_config()
  config.data.source = "imagenet"
  with pytest.raises(ValueError, match=r"config.data.source='imagenet'.*original.*synthetic"):
    sources.get_source(config)


def test_unbuilt_dataset_says_to_prepare(tiny_data_config, tmp_path):
  config = copy_of(tiny_data_config, **{"data.tfds_dir": str(tmp_path)})
  with pytest.raises(ValueError, match="prepare"):
    pipeline.create_train_iterator(config)


def test_a_built_dataset_whose_lock_cannot_be_opened_is_read(tiny_data_config, tmp_path):
  # A copy of the built data in a folder this process cannot write. Tests run as root, for whom
  # chmod does not stop writes, so the lock file is made unopenable instead: a directory in its
  # place fails `open(path, "a")` as a read-only disk does.
  shutil.copytree(tiny_data_config.data.tfds_dir, tmp_path / "tfds")
  config = copy_of(tiny_data_config, **{"data.tfds_dir": str(tmp_path / "tfds"),
                                        "data.predecoded": True})
  pipeline.predecode(config, "train")  # Both ways of reading are there, as after a run.
  source = sources.get_source(config)
  lock = os.path.join(source.builder.data_dir_root, f".{source.name.replace('/', '-')}.lock")
  if os.path.exists(lock):
    os.remove(lock)
  os.mkdir(lock)
  for predecoded in (True, False):
    config.data.predecoded = predecoded
    pipeline.prepare(config)
    assert next(pipeline.create_train_iterator(config))["fg_bg"].shape[0] == config.batch_size
  assert next(pipeline.create_eval_batches(config, "test"))["fg_bg"].shape[0] == 4
  assert os.path.isdir(lock)


_READ_WITHOUT_TF = HIDE_TENSORFLOW + """
import json
from dmjax import config as config_lib
from dmjax.data import pipeline

config = config_lib.base_config()
config.update_from_flattened_dict(json.loads(sys.argv[1]))
batch = next(pipeline.create_train_iterator(config))
eval_batch = next(pipeline.create_eval_batches(config, "test", 2))
# Building needs no TensorFlow either: every image is encoded with PIL.
config.data.tfds_dir = sys.argv[2]
config.data.synthetic.update(num_train=4, num_test=2)
pipeline.prepare(config)
assert pipeline.num_examples(config, "train") == 4
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print(json.dumps({key: list(value.shape) for key, value in batch.items()}))
"""


def test_reading_and_building_need_no_tensorflow(tiny_data_config, tmp_path):
  keys = ("data.tfds_dir", "data.resolution", "data.synthetic.resolution",
          "data.synthetic.num_train", "data.synthetic.num_test", "batch_size")
  flat = {key: lookup(tiny_data_config, key) for key in keys}
  result = subprocess.run(
      [sys.executable, "-c", _READ_WITHOUT_TF, json.dumps(flat), str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  shapes = json.loads(result.stdout.strip().splitlines()[-1])
  assert shapes == {"bg": [4, 32, 32, 3], "fg_bg": [4, 32, 32, 3], "mask": [4, 32, 32, 1],
                    "depth": [4, 32, 32, 1]}


def predecoding(config, **overrides):
  return copy_of(config, **{"data.predecoded": True, **overrides})


def stored_ids(batches, examples):
  lookup = {example["fg_bg"].tobytes(): i for i, example in enumerate(examples)}
  return [lookup[image.tobytes()] for batch in batches for image in batch["fg_bg"]]


def test_batches_are_the_stored_examples_decoded_or_predecoded(tiny_data_config):
  config = predecoding(tiny_data_config)
  predecoded = take(pipeline.create_train_iterator(config), 7)
  decoded = take(pipeline.create_train_iterator(copy_of(config, **{"data.predecoded": False})), 7)
  assert_same_batches(predecoded, decoded)
  examples = stored_examples(config, "train")
  ids = stored_ids(predecoded, examples)
  for i, key in enumerate(schema.KEYS):
    batch = predecoded[i][key]
    assert batch.dtype == examples[0][key].dtype and batch.shape == (4, *examples[0][key].shape)
    np.testing.assert_array_equal(batch[1], examples[ids[i * 4 + 1]][key])


def test_stream_covers_each_epoch_across_processes_and_reshuffles(tiny_data_config):
  config = predecoding(tiny_data_config)
  examples = stored_examples(config, "train")
  # 24 examples, global batch 4 over 2 processes: 6 global batches per epoch.
  ids = {p: stored_ids(take(pipeline.create_train_iterator(config, process_index=p,
                                                           process_count=2), 12), examples)
         for p in (0, 1)}
  one_process = stored_ids(take(pipeline.create_train_iterator(config), 12), examples)
  interleaved = [ids[p][2 * b + k] for b in range(12) for p in (0, 1) for k in (0, 1)]
  assert interleaved == one_process  # Process p holds its slice of each global batch.
  assert sorted(one_process[:24]) == sorted(one_process[24:]) == list(range(24))
  assert one_process[:24] != one_process[24:]
  other_seed = stored_ids(take(pipeline.create_train_iterator(copy_of(config, seed=1)), 6),
                          examples)
  assert other_seed != one_process[:24]


def test_state_round_trip_and_workers_unpickle_the_stream(tiny_data_config):
  config = predecoding(tiny_data_config)
  iterator = pipeline.create_train_iterator(config)
  take(iterator, 5)  # Crosses into the second epoch.
  state = iterator.get_state()
  expected = take(iterator, 3)
  restored = pipeline.create_train_iterator(config)
  restored.set_state(state)
  assert_same_batches(take(restored, 3), expected)
  # Predecoding changes how the batches are gathered, not which they are.
  decoded = pipeline.create_train_iterator(tiny_data_config)
  decoded.set_state(state)
  assert_same_batches(take(decoded, 3), expected)
  # Worker processes get the batch transform by pickle: it must arrive whole and work there.
  stream = pipeline.StoredBatch(
      pipeline.PredecodedExamples(pipeline.predecoded_dir(config, "train")), seed=0,
      global_batch_size=4, local_batch_size=4, process_index=0)
  stream.map(3)
  copy = pickle.loads(pickle.dumps(stream))
  assert_same_batches([copy.map(k) for k in range(8)], [stream.map(k) for k in range(8)])


def test_grain_workers_outlive_sigterm(tiny_data_config):
  # Clusters send SIGTERM to every process of a job; the main process saves a checkpoint on it
  # and needs its workers' batches until then (dmjax.preemption).
  config = predecoding(tiny_data_config, **{"data.num_workers": 1})
  before = set(multiprocessing.active_children())
  iterator = pipeline.create_train_iterator(config)
  batches = take(iterator, 2)
  workers = set(multiprocessing.active_children()) - before
  assert workers
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(2)
  batches += take(iterator, 10)  # More than the workers had ready.
  iterator.close()
  assert_same_batches(batches, take(pipeline.create_train_iterator(predecoding(tiny_data_config)),
                                    12))


def test_predecoding_is_all_or_nothing(tiny_data_config):
  config = predecoding(tiny_data_config, **{"data.transfer_resolution": 24})
  directory = pipeline.predecoded_dir(config, "train")
  os.makedirs(directory + ".partial-1")  # What a killed build leaves: never taken as done.
  assert not os.path.exists(directory)
  assert pipeline.predecode(config, "train") == directory
  arrays = {key: np.load(os.path.join(directory, key + ".npy")) for key in schema.KEYS}
  assert arrays["fg_bg"].shape == (24, 24, 24, 3) and arrays["depth"].dtype == np.uint16
  # Ours was renamed; the dead process's was removed (under the build lock, so no live process
  # was writing it), and its space is free again.
  assert glob.glob(directory + ".partial-*") == []


def test_examples_of_different_sizes_need_a_transfer_resolution():
  small = {"bg": np.zeros((8, 8, 3), np.uint8), "fg_bg": np.zeros((8, 8, 3), np.uint8),
           "mask": np.zeros((8, 8, 1), np.uint8), "depth": np.zeros((8, 8, 1), np.uint16)}
  large = {key: np.repeat(np.repeat(value, 2, 0), 2, 1) for key, value in small.items()}
  encoded = [tfds_builder.encode_example(small), tfds_builder.encode_example(large)]
  with pytest.raises(ValueError, match="config.data.transfer_resolution"):
    pipeline.DecodedExamples(encoded, 0).gather(np.array([0, 1]))
  batch = pipeline.DecodedExamples(encoded, 12).gather(np.array([0, 1]))
  assert batch["fg_bg"].shape == (2, 12, 12, 3) and batch["depth"].dtype == np.uint16


def test_states_saved_before_the_host_path_was_removed(tiny_data_config):
  iterator = pipeline.create_train_iterator(tiny_data_config)
  take(iterator, 2)
  expected = take(iterator, 2)
  saved = json.loads(iterator.get_state())
  # What this stream saved before issue 14 (tests/data/workdir_before_restructure has one).
  restored = pipeline.create_train_iterator(tiny_data_config)
  restored.set_state(json.dumps({**saved, "on_device": True, "next_batch": 2}).encode())
  assert_same_batches(take(restored, 2), expected)
  # What the host augmentation path saved: another stream, refused in one line.
  host_state = {k: v for k, v in saved.items() if k != "transfer_resolution"}
  with pytest.raises(ValueError, match=r"^the saved data iterator state is of the host "
                     r"augmentation path.*--config.init_from"):
    restored.set_state(json.dumps(host_state).encode())


class CountingBatches:
  """A host iterator that counts the batches taken from it; its state is that count."""

  def __init__(self):
    self.taken = 0

  def __next__(self):
    self.taken += 1
    return {"x": np.full((2, 3), self.taken, np.float32)}

  def get_state(self):
    return self.taken


@pytest.mark.parametrize("size", [1, 2, 3])
def test_device_prefetcher_keeps_size_batches_on_the_devices(size):
  import jax

  from dmjax import parallel

  host = CountingBatches()
  prefetcher = parallel.DevicePrefetcher(host, parallel.batch_sharding(parallel.create_mesh()),
                                         size=size)
  assert host.taken == 0 and prefetcher.get_state() == 0  # Nothing taken before it is asked.
  for handed_out in range(1, 6):
    batch = next(prefetcher)
    assert isinstance(batch["x"], jax.Array) and float(batch["x"][0, 0]) == handed_out
    # The batch just handed out and the ones waiting behind it: `size` on the devices.
    assert host.taken - handed_out + 1 == size
    assert prefetcher.get_state() == handed_out  # Resumes after the last batch handed out.
