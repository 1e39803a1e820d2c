"""Imports weights of the original PyTorch models into a dmjax workdir.

    python -m dmjax.import_torch --model=unet_dual --state_dict=model.pth --workdir=/tmp/original

writes the weights as step 0 of `workdir` with that model's config, so evaluation and prediction
read it like any training run (`dmjax.models.torch_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from dmjax import cli
from dmjax.models import torch_weights


def define_flags(f: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_enum("model", "depthmasknet", sorted(torch_weights.ORIGINALS), "The model.",
                    flag_values=f)
  flags.DEFINE_string("state_dict", None, "The model's .pth state dict.", flag_values=f,
                      required=True)
  flags.DEFINE_string("workdir", None, "Where to write the imported checkpoint (new or empty).",
                      flag_values=f, required=True)


def import_with_flags(f: flags.FlagValues) -> None:
  torch_weights.import_state_dict(f.state_dict, f.workdir, f.model)


def main(argv: Sequence[str] | None = None) -> None:
  cli.run(__doc__, define_flags, import_with_flags, argv, program="dmjax-import-torch",
          info_logs=True)


if __name__ == "__main__":
  main()
