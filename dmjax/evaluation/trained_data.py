"""Which data a saved run trained on, and how the data an evaluation reads differs from it.

A run's checkpoints name the built dataset its training stream came from (the data iterator
state's `dataset`). The original layout's datasets are named by their composites and record
them per split (`tfds_builder.built_composites`), and their splits are drawn by a hash of each
composite's name: a folder that gained composites since the run is another dataset, whose test
split holds the old test composites and some new ones, none of the run's training composites.
`compare` says so in one line, with the new composites; `choose_config` keeps runs trained on
datasets built before splits were drawn by name on the data they trained on.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import ml_collections

from dmjax import checkpoints, errors
from dmjax.data import sources, tfds_builder

ORIGINAL_DATASET = tfds_builder.DmjaxOriginal.name  # "dmjax_seed"
_SHOWN = 5  # New composites named in the one-line note; all of them are in the JSON.


def trained_dataset(workdir: str, step: int) -> str | None:
  """The dataset (`builder/config`) of the run's training stream at `step`, as its checkpoint
  records it; None for checkpoints without a data iterator (imported weights)."""
  states = sorted(glob.glob(os.path.join(checkpoints.checkpoint_dir(workdir), str(step), "data",
                                         "process_0-of-*.json")))
  if not states:
    return None
  with open(states[0]) as f:
    return json.load(f).get("dataset")


def _original_config_name(dataset: str | None) -> str | None:
  """The config part of an original-layout dataset's name; None for other datasets."""
  if dataset is None or not dataset.startswith(ORIGINAL_DATASET + "/"):
    return None
  return dataset.split("/", 1)[1]


def _same_folder(a: str, b: str) -> bool:
  return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def _reading(config: ml_collections.ConfigDict, dataset_name: str) -> ml_collections.ConfigDict:
  """`config` reading the built original-layout dataset `dataset_name`, not the folder's now."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.original_layout.dataset_name = dataset_name
  return config


def choose_config(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict,
                  trained_on: str | None) -> tuple[ml_collections.ConfigDict, str | None]:
  """The evaluation's config, and a note on the data it reads, for a run trained on `trained_on`.

  A run trained on an original-layout dataset built before splits were drawn by name (a random
  permutation, which a single added file changes) is evaluated on that dataset as built, if it
  is in `data.tfds_dir`, whenever the evaluation reads the folder the run trained on: the
  folder's split today could hold its training composites. Without it, that is a one-line
  error; another folder (`--data_dir`) is evaluated as asked.
  """
  name = _original_config_name(trained_on)
  if (name is None or tfds_builder.is_named_by_composites(name)
      or config.data.source != "original" or not _same_folder(config.data.dir, saved.data.dir)):
    return config, None
  legacy = _reading(config, name)
  source = sources.get_source(legacy)
  if not source.builder.is_prepared():
    raise errors.UserError(
        f"this run trained on {trained_on}, whose split was drawn before splits were drawn by "
        f"name, and it is not built in {source.builder.data_dir_root}; today's split of "
        f"{config.data.dir} could put the run's training composites in its test split. Point "
        "--tfds_dir at the folder it was built in, or evaluate other data with --data_dir")
  return legacy, (f"evaluating {trained_on}, the data this run trained on as it was built "
                  "(before splits were drawn by name), not the folder as it is now")


@dataclasses.dataclass
class DataChange:
  """How the evaluated dataset differs from the one the run trained on."""

  trained_on: str
  evaluated: str
  split: str
  new: list[str] | None = None  # Composites not in the trained-on dataset; None: unknown.
  new_in_split: list[str] | None = None  # Those of them in the evaluated split.
  gone: int | None = None
  trained_in_split: int | None = None  # Training composites of the run in the evaluated split.
  why_unknown: str = ""

  def line(self) -> str:
    head = f"the data differs from what this run trained on ({self.trained_on} -> {self.evaluated})"
    if self.new is None:
      return f"{head}; {self.why_unknown}"
    shown = ", ".join(self.new_in_split[:_SHOWN]) + (", ..." if len(self.new_in_split) > _SHOWN
                                                      else "")
    text = (f"{head}: {len(self.new)} composite(s) new, {len(self.new_in_split)} of them in "
            f"the {self.split} split" + (f" ({shown})" if shown else "")
            + f"; {self.gone} gone; ")
    if self.trained_in_split:
      return text + (f"{self.trained_in_split} of the {self.split} split's composites were "
                     "training composites of the run: its metrics there are optimistic")
    return text + (f"none of the {self.split} split's composites was a training composite of "
                   "the run")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def compare(config: ml_collections.ConfigDict, trained_on: str | None,
            split: str) -> DataChange | None:
  """None when `config`'s (built) dataset is the one the run trained on, or that is unknown;
  else how they differ, by the composites both record where both are built here."""
  evaluated = sources.get_source(config).name
  if trained_on is None or trained_on == evaluated:
    return None
  change = DataChange(trained_on=trained_on, evaluated=evaluated, split=split)
  trained_name = _original_config_name(trained_on)
  if trained_name is None or _original_config_name(evaluated) is None:
    change.why_unknown = "another source of data, as asked"
    return change
  trained_source = sources.get_source(_reading(config, trained_name))
  if not trained_source.builder.is_prepared():
    change.why_unknown = (f"{trained_on} is not built in {trained_source.builder.data_dir_root}, "
                          "so which composites are new is unknown")
    return change
  before = tfds_builder.built_composites(trained_source.builder)
  now = tfds_builder.built_composites(sources.get_source(config).builder)
  if before is None or now is None:
    change.why_unknown = ("it was built before datasets recorded their composites, so which are "
                          "new is unknown")
    return change
  trained_all = {key for keys in before.values() for key in keys}
  now_all = {key for keys in now.values() for key in keys}
  change.new = sorted(now_all - trained_all)
  change.new_in_split = sorted(set(now.get(split, ())) - trained_all)
  change.gone = len(trained_all - now_all)
  change.trained_in_split = len(set(now.get(split, ())) & set(before.get("train", ())))
  return change
