"""The one place every config key is defined, with its default.

Configs in `configs/` start from `base_config()` and change what their stage needs; anything a
command line names that is not defined here is refused by `ml_collections.config_flags`.
Variants are chosen by a config string argument, big_vision style:
`configs/r64.py:data=seed,recipe=seed,schedule=full`.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "depthmasknet_v2"  # A name from dmjax.models.MODELS.
  c.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16"; parameters stay float32.
  c.model.blur = True  # depthmasknet_v2 only: blur after each pixel shuffle.

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # A name from dmjax.data.sources: "synthetic" or "seed".
  c.data.dir = ""  # "seed": folder (or folder of zips) in the SPEC §4 layout.
  c.data.tfds_dir = ""  # Where built TFDS datasets live; "" = ~/tensorflow_datasets.
  c.data.resolution = 64  # Side of the square images the model sees.
  c.data.num_workers = 0  # grain worker processes; 0 = in the main process.
  c.data.prefetch = 2  # Batches each worker keeps ready.
  c.data.binarize_mask = True  # Threshold soft mask labels at 0.5 for the loss (SPEC §4).
  # Augment, resize and normalise training batches inside the train step (dmjax.data.
  # device_augment); the host only gathers stored uint8 examples. What a GPU needs.
  c.data.on_device = False
  c.data.transfer_resolution = 0  # on_device: side of what the host sends; 0 = as stored.
  c.data.predecoded = False  # on_device: decode the train split once to memory-mapped arrays.
  c.data.eval_split = "test"
  c.data.num_eval_examples = 512  # Held-out examples per periodic evaluation; -1 = all.

  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_train = 12_000
  c.data.synthetic.num_test = 1_000
  c.data.synthetic.resolution = 80  # Rendered size; crops and resizes to data.resolution.
  c.data.synthetic.seed = 0

  c.data.seed_layout = ml_collections.ConfigDict()
  c.data.seed_layout.bg_dir = "bg"
  c.data.seed_layout.fg_bg_dir = "bg_fg"
  c.data.seed_layout.mask_dir = "mask"
  c.data.seed_layout.depth_dir = "depth"
  # Regular expression with named groups `bg`, `fg`, `i`, matched against fg_bg file names; the
  # mask and depth partners have the same groups in their own patterns.
  c.data.seed_layout.fg_bg_pattern = r"bgfg_b(?P<bg>\d+)_f(?P<fg>\d+)_(?P<i>\d+)\.jpg"
  c.data.seed_layout.mask_pattern = "mask_b{bg}_f{fg}_{i}.jpg"
  c.data.seed_layout.depth_pattern = "densedepth_b{bg}_f{fg}_{i}.jpg"
  c.data.seed_layout.split = "image"  # "image": the seed's 70/30 split; "background": by bg.
  c.data.seed_layout.test_fraction = 0.3
  c.data.seed_layout.skip_bad = False  # Skip (count and list) bad examples instead of failing.

  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True
  c.data.augment.flip = True  # Horizontal flip, same for all four images.
  c.data.augment.min_scale = 0.6  # Random crop covering [min_scale, 1] of the side.
  c.data.augment.brightness = 0.15  # Photometric jitter, drawn independently for bg and fg_bg.
  c.data.augment.contrast = 0.15
  c.data.augment.saturation = 0.15

  c.loss = ml_collections.ConfigDict()
  c.loss.mask_bce = 1.0
  c.loss.mask_dice = 1.0
  c.loss.dice_per_image = False  # Dice averaged per image instead of over the whole batch.
  c.loss.depth_l1 = 0.1
  c.loss.depth_ssim = 1.0
  c.loss.depth_edge = 1.0
  c.loss.depth_bce_dice = 0.0  # The seed's BCE + Dice on depth.
  c.loss.ssim_window = 11  # 11 = Wang et al. reference; 3 = the seed.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # "adamw" or "sgd".
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"  # "cosine" (with warm-up) or "step" (the seed's).
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 1e-4
  c.optimizer.momentum = 0.9  # sgd only.
  c.optimizer.step_every = 0  # step schedule: decay every this many steps (0 = never).
  c.optimizer.step_factor = 0.01  # step schedule: multiply the rate by this at each decay.
  c.optimizer.grad_clip_norm = 1.0  # 0 = no clipping.

  c.batch_size = 32  # Global batch over all devices of all processes.
  c.eval_batch_size = 64
  c.num_train_steps = 3_000
  c.log_every_steps = 50
  c.eval_every_steps = 1_000
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.init_from = ""  # Workdir of a previous stage: start from its final parameters.
  c.profile = False  # Capture a profile of a few steps (CLU Profile hook).
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` config arguments against the allowed keys and defaults."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(
          f"config argument {item!r}: expected key=value with key one of {sorted(defaults)}")
    parsed[key] = type(defaults[key])(value)
  return parsed


# The seeds' progressive resizing (SPEC §5): batch size and epochs of each stage, one epoch being
# the seed's 280,000 training composites.
SEED_STAGES = {64: (512, 3), 112: (128, 3), 192: (32, 2)}
SEED_EPOCH_EXAMPLES = 280_000
# What fits a 2-core CPU: (batch size, steps) of each stage.
CPU_STAGES = {64: (32, 2_400), 112: (16, 1_500), 192: (8, 1_000)}


def stage_config(resolution: int, arg: str | None) -> ml_collections.ConfigDict:
  """The config of one progressive-resizing stage, with the variant `arg` chooses.

  data=synthetic|seed   the built-in scenes, or the seed layout in --config.data.dir=DIR
  recipe=default|seed   our model and recipe, or the seed's own (faithful model, SGD 0.01
                        momentum 0.9, weight decay 1e-5, ×0.01 step decay every epoch, its
                        losses, no augmentation) for side-by-side comparison
  schedule=cpu|full     a run that fits a 2-core CPU, or the seeds' 280k-example epochs (GPU)
  """
  args = parse_arg(arg, data="synthetic", recipe="default", schedule="cpu")
  c = base_config()
  c.data.resolution = resolution
  c.data.source = args.data
  if args.data not in ("synthetic", "seed"):
    raise ValueError(f"config argument data={args.data!r}: expected synthetic or seed")

  # The host only gathers stored examples; the train step augments them (dmjax.data.
  # device_augment). On a GPU the host could not keep up otherwise; on a CPU the step shares the
  # cores with the host, and augmenting in XLA costs it less than PIL does.
  c.data.on_device = True
  if args.schedule == "cpu":
    c.batch_size, c.num_train_steps = CPU_STAGES[resolution]
    c.data.synthetic.resolution = resolution + resolution // 4
    c.data.predecoded = True  # 12,000 examples: 0.7 GB at 64 px, 6.2 GB at 192.
  elif args.schedule == "full":
    c.batch_size, epochs = SEED_STAGES[resolution]
    c.num_train_steps = epochs * SEED_EPOCH_EXAMPLES // c.batch_size
    c.data.synthetic.num_train = SEED_EPOCH_EXAMPLES
    c.data.synthetic.num_test = 10_000
    c.data.synthetic.resolution = 240
    c.data.num_workers = 8
    # Sent at the size the CPU stages render at. Predecoded, 280k examples take 16 GB at 64 px
    # (80² px × 9 bytes each); larger ones are decoded as they are gathered.
    c.data.transfer_resolution = resolution + resolution // 4
    c.data.predecoded = resolution == 64
    if c.data.predecoded:
      # Gathering rows is a copy that one process does at ~57k examples/s; worker processes
      # would pass every batch through shared memory, which measured 7x slower
      # (docs/benchmarks.md).
      c.data.num_workers = 0
    c.model.dtype = "bfloat16"  # Tensor cores; parameters, BatchNorm statistics, losses float32.
    c.data.num_eval_examples = 2_048
    # References: `--config.num_train_steps=N` moves these with it.
    c.eval_every_steps = c.get_ref("num_train_steps") // 10
    c.checkpoint_every_steps = c.get_ref("num_train_steps") // 20
    c.log_every_steps = 100
    c.eval_batch_size = 256
  else:
    raise ValueError(f"config argument schedule={args.schedule!r}: expected cpu or full")

  if args.recipe == "seed":
    c.model.name = "depthmasknet"
    c.model.dtype = "float32"  # As the seeds trained.
    c.optimizer.update(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-5,
                       schedule="step", step_factor=0.01, grad_clip_norm=0.0, warmup_steps=0)
    # Decay where the seed's epochs ended, at the same fractions of the stage, however long
    # `--config.num_train_steps` makes it.
    c.optimizer.step_every = c.get_ref("num_train_steps") // SEED_STAGES[resolution][1]
    # Its losses (seed 002), on the sigmoid of the logits rather than the raw logits it used.
    c.loss.update(mask_bce=1.0, mask_dice=1.0, depth_l1=1.0, depth_ssim=1.0, depth_edge=0.0,
                  depth_bce_dice=1.0, ssim_window=3)
    c.data.augment.enabled = False
  elif args.recipe != "default":
    raise ValueError(f"config argument recipe={args.recipe!r}: expected default or seed")
  return c
