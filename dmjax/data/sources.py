"""The data sources `config.data.source` can name, each a TFDS builder and its splits."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import ml_collections
import tensorflow_datasets as tfds

from dmjax import errors
from dmjax.data import tfds_builder


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a source's examples live: its builder (name + config) and how to build it."""

  builder: tfds.core.DatasetBuilder
  splits: tuple[str, ...]
  download_config: tfds.download.DownloadConfig

  @property
  def name(self) -> str:
    """`dataset/config`, enough to tell two built datasets apart."""
    return f"{self.builder.name}/{self.builder.builder_config.name}"


def _download_config(**kwargs) -> tfds.download.DownloadConfig:
  # TFDS's statistics pass reads everything back through tf.data: slow, and needs TensorFlow.
  return tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP, **kwargs)


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data.tfds_dir or None  # None: TFDS's default (~/tensorflow_datasets).


_builders: dict[tuple, tfds.core.DatasetBuilder] = {}


def _builder(builder_class: type[tfds.core.DatasetBuilder], builder_config: tfds.core.BuilderConfig,
             data_dir: str | None, reload: bool = False) -> tfds.core.DatasetBuilder:
  """One builder per dataset and process: TFDS logs a warning for each custom-config builder it
  makes, and the trainer asks for the source at every evaluation. A builder reads the dataset's
  description once, when it is made: `reload` makes a new one."""
  key = (builder_class.__name__, builder_config.name, data_dir)
  if reload or key not in _builders:
    _builders[key] = builder_class(config=builder_config, data_dir=data_dir)
  return _builders[key]


def synthetic_source(config: ml_collections.ConfigDict, reload: bool = False) -> Source:
  builder = _builder(tfds_builder.DmjaxSynthetic,
                     tfds_builder.SyntheticConfig.from_config(config.data), _data_dir(config),
                     reload)
  return Source(builder=builder, splits=tfds_builder.SPLITS, download_config=_download_config())


def original_source(config: ml_collections.ConfigDict, reload: bool = False) -> Source:
  builder = _builder(tfds_builder.DmjaxOriginal, tfds_builder.OriginalConfig.from_config(config),
                     _data_dir(config), reload)
  manual_dir = tfds_builder.original_manual_dir(config.data.dir)
  return Source(builder=builder, splits=tfds_builder.SPLITS,
                download_config=_download_config(manual_dir=manual_dir))


def with_absolute_data_dir(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, or a copy whose `data.dir` is absolute: a run saves its config so, and the tools
  that read the run later (evaluate) find the same folder from any working directory."""
  if not config.data.dir or os.path.isabs(config.data.dir):
    return config
  config = config.copy_and_resolve_references()
  config.data.dir = os.path.abspath(config.data.dir)
  return config


SOURCES: dict[str, Callable[..., Source]] = {
    "synthetic": synthetic_source,
    "original": original_source,
}


def get_source(config: ml_collections.ConfigDict, *, reload: bool = False) -> Source:
  """The source `config.data.source` names; `reload`: with a new builder, which reads what is
  built now (another process may have built it since this one made its builder)."""
  factory = SOURCES.get(config.data.source)
  if config.data.source == "seed":  # Its name before issue 14.
    raise errors.UserError("config.data.source='seed': the original system's data is now "
                           "config.data.source='original'")
  if factory is None:
    raise errors.UserError(f"config.data.source={config.data.source!r} is not a known data source; "
                           f"known: {sorted(SOURCES)}")
  return factory(config, reload)
