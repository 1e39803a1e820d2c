"""The one place every config key is defined, with its default.

Configs in `configs/` start from `base_config()` and change what their stage needs; anything a
command line names that is not defined here is refused by `ml_collections.config_flags`.
Variants are chosen by a config string argument, big_vision style:
`configs/r64.py:data=original,recipe=original,schedule=full`.
"""

from __future__ import annotations

import copy

import ml_collections

from dmjax import errors


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Initialisation, data order and augmentation draws (not the scenes themselves).

  c.model = ml_collections.ConfigDict()
  c.model.name = "depthmasknet_v2"  # A name from dmjax.models.MODELS.
  c.model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16"; parameters stay float32.
  c.model.blur = True  # depthmasknet_v2 only: blur after each pixel shuffle.
  # Run the model at half the input size and sharpen its logits back to full size with a small
  # full-resolution refiner (dmjax.models.refiner); photos of any size: dmjax.inference.cascade.
  c.model.refiner = False
  c.model.refiner_features = 12  # Channels of the refiner's convolutions.
  c.model.refiner_window = 0  # Train the refiner on this window of each example; 0 = all of it.
  # unet_dual only: "leaky_relu" (slope 0.2, the logged run) or "relu" (the stored code).
  c.model.decoder_activation = "leaky_relu"
  # unet_dual, u2netp_dual: how the model rescales its (dataset-standardised) photos: "dataset"
  # (as given), "unit" (rgb in [0, 1], seed 004) or "image_max" (rgb / its max, seed 003).
  c.model.input_norm = "dataset"
  c.model.variant = "S"  # two_stage only: "S" (5.8M parameters) or "full" (40.1M).
  c.model.stage2_input = "concat"  # two_stage only: "concat", "multiply" or "both".
  c.model.teacher_forcing_steps = 0  # two_stage only: anneal ground-truth masks out by then.

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # A name from dmjax.data.sources: "synthetic" or "original".
  c.data.dir = ""  # "original": folder (or folder of zips) in the SPEC §4 layout.
  c.data.tfds_dir = ""  # Where built TFDS datasets live; "" = ~/tensorflow_datasets.
  c.data.resolution = 64  # Side of the square images the model sees.
  c.data.num_workers = 0  # grain worker processes; 0 = in the main process.
  c.data.prefetch = 2  # Batches each worker keeps ready.
  c.data.binarize_mask = True  # Threshold soft mask labels at 0.5 for the loss (SPEC §4).
  # The host only gathers stored uint8 examples; the train step augments, resizes and
  # normalises them (dmjax.data.augment). `data.on_device`, which chose between that and PIL on
  # the host, is gone: saved configs that have it are read through `upgrade_saved`, and
  # `validate` refuses it set to False.
  c.data.transfer_resolution = 0  # Side of the examples the host sends; 0 = as stored.
  c.data.predecoded = False  # Decode the train split once to memory-mapped arrays.
  c.data.eval_split = "test"
  c.data.num_eval_examples = 512  # Held-out examples per periodic evaluation; -1 = all.

  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_train = 12_000
  c.data.synthetic.num_test = 1_000
  c.data.synthetic.resolution = 80  # Rendered size; crops and resizes to data.resolution.
  c.data.synthetic.seed = 0

  # The original system's dataset layout (SPEC §4), data.source="original"; called
  # `data.seed_layout` before (saved configs are translated by `upgrade_saved`).
  c.data.original_layout = ml_collections.ConfigDict()
  c.data.original_layout.bg_dir = "bg"
  c.data.original_layout.fg_bg_dir = "bg_fg"
  c.data.original_layout.mask_dir = "mask"
  c.data.original_layout.depth_dir = "depth"
  # Regular expression with named groups `bg`, `fg`, `i`, matched against fg_bg file names; the
  # mask and depth partners have the same groups in their own patterns.
  c.data.original_layout.fg_bg_pattern = r"bgfg_b(?P<bg>\d+)_f(?P<fg>\d+)_(?P<i>\d+)\.jpg"
  c.data.original_layout.mask_pattern = "mask_b{bg}_f{fg}_{i}.jpg"
  c.data.original_layout.depth_pattern = "densedepth_b{bg}_f{fg}_{i}.jpg"
  # "image": the original's random 70/30 split; "background": whole backgrounds held out.
  c.data.original_layout.split = "image"
  c.data.original_layout.test_fraction = 0.3
  # Seeds the train/test split (and so names the built dataset); not the training seed, so that
  # changing `seed` keeps the test set.
  c.data.original_layout.split_seed = 0
  # Skip (count and list) bad examples instead of failing.
  c.data.original_layout.skip_bad = False

  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True
  c.data.augment.flip = True  # Horizontal flip, same for all four images.
  c.data.augment.min_scale = 0.6  # Random crop covering [min_scale, 1] of the side.
  c.data.augment.brightness = 0.15  # Photometric jitter, drawn independently for bg and fg_bg.
  c.data.augment.contrast = 0.15
  c.data.augment.saturation = 0.15

  c.loss = ml_collections.ConfigDict()
  # Weights of the loss terms (dmjax.losses documents each); 0 = not computed.
  c.loss.mask_bce = 1.0
  c.loss.mask_dice = 1.0
  # Dice averaged per image instead of over the whole batch, so that a small object counts as
  # much as a large one, as per-image IoU and boundary F count them (README, "What command 1
  # gives").
  c.loss.dice_per_image = True
  c.loss.depth_l1 = 0.1
  # Relative depth errors, which δ1 and AbsRel count (its effect: README, "What command 1 gives").
  c.loss.depth_log_l1 = 1.0
  # The same after fitting each image's scale and shift, as δ1 aligned does (README, "What
  # command 1 gives").
  c.loss.depth_aligned_log_l1 = 1.0
  c.loss.depth_ssim = 1.0
  c.loss.depth_edge = 1.0
  c.loss.depth_bce_dice = 0.0  # The original's BCE + Dice on depth (seed 002).
  c.loss.ssim_window = 11  # 11 = Wang et al. reference; 3 = the original (seed 002).
  # "reference": valid filtering, clip((1 - SSIM) / 2, 0, 1); "kornia2020": the original's kornia
  # SSIM, reflect padding, clip(1 - SSIM, 0, 1) / 2 (dmjax.losses.ssim_loss).
  c.loss.ssim_form = "reference"
  # model.refiner: weight of the same loss terms on the base network's own (half-size) logits.
  c.loss.coarse = 1.0
  # The other originals' terms (dmjax.losses): seed 004's IoU loss and Sobel edge, seed 003's BCE on
  # depth and deep supervision of the side outputs (u2netp_dual only), Hu et al.'s depth loss.
  c.loss.mask_iou = 0.0
  c.loss.depth_bce = 0.0
  c.loss.depth_sobel_edge = 0.0
  c.loss.depth_hu = 0.0
  c.loss.side_bce = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # "adamw" or "sgd".
  c.optimizer.learning_rate = 2e-3  # Peak rate (after warm-up).
  # "cosine" (with warm-up), "step" (seed 002's) or "one_cycle" (seed 003's: linear from
  # one_cycle_start · learning_rate up to learning_rate at half the steps, and back down).
  c.optimizer.schedule = "cosine"
  c.optimizer.one_cycle_start = 0.1  # one_cycle: the first rate, as a fraction of the peak.
  c.optimizer.warmup_steps = 200  # cosine: linear warm-up from 0.
  c.optimizer.weight_decay = 1e-4  # adamw: decoupled, kernels only; sgd: L2 on all, as PyTorch.
  c.optimizer.momentum = 0.9  # sgd only.
  c.optimizer.step_every = 0  # step schedule: decay every this many steps (0 = never).
  c.optimizer.step_factor = 0.01  # step schedule: multiply the rate by this at each decay.
  c.optimizer.grad_clip_norm = 1.0  # 0 = no clipping.

  c.batch_size = 32  # Global batch over all devices of all processes.
  c.eval_batch_size = 64  # Global, like batch_size.
  c.num_train_steps = 3_000
  # Steps between logging, evaluating and saving; 0 = never (the last step always saves and
  # evaluates).
  c.log_every_steps = 50
  c.eval_every_steps = 1_000
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3  # The newest this many are kept.
  c.init_from = ""  # Workdir of a previous stage: start from its final parameters.
  c.profile = False  # Capture a profile of a few steps (CLU Profile hook).
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` config arguments against the allowed keys and defaults."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise errors.UserError(
          f"config argument {item!r}: expected key=value with key one of {sorted(defaults)}")
    parsed[key] = type(defaults[key])(value)
  return parsed


# Steps between two of each periodic action; 0 = never (a derived interval may round to 0).
INTERVAL_KEYS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                 "optimizer.step_every", "optimizer.warmup_steps")
SSIM_FORMS = ("reference", "kornia2020")  # loss.ssim_form: see dmjax.losses.ssim_loss.


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Refuses settings that cannot work, before anything is built or compiled.

  Raises `dmjax.errors.UserError` with one line naming the key. `device_count` defaults to
  `jax.device_count()` (all devices of all processes).
  """
  if device_count is None:
    import jax  # noqa: PLC0415  (configs are read without JAX)

    device_count = jax.device_count()
  from dmjax.models.layers import SIZE_MULTIPLE  # noqa: PLC0415  (nor Flax)

  def refuse(key: str, what: str):
    raise errors.UserError(f"config.{key}={_lookup(config, key)!r}: {what}")

  def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

  # Spellings of before issue 14 (saved configs are translated by `upgrade_saved` instead).
  if config.data.source == "seed":
    refuse("data.source", "the original system's data is now data.source='original'")
  if "seed_layout" in config.data:
    raise errors.UserError("config.data.seed_layout: renamed config.data.original_layout")
  if config.data.get("on_device", True) is not True:
    refuse("data.on_device", "the host augmentation path is gone; training batches are always "
           "augmented in the train step (dmjax.data.augment), so drop the key")
  if not is_int(config.num_train_steps) or config.num_train_steps < 1:
    refuse("num_train_steps", "expected a positive number of steps")
  for key in INTERVAL_KEYS:
    value = _lookup(config, key)
    if not is_int(value) or value < 0:
      refuse(key, "expected a whole number of steps, 0 for never")
  for key in ("batch_size", "eval_batch_size"):
    value = _lookup(config, key)
    if not is_int(value) or value < 1 or value % device_count:
      refuse(key, f"expected a positive multiple of the {device_count} devices (every device "
             "gets an equal share of each batch)")
  if not is_int(config.keep_checkpoints) or config.keep_checkpoints < 1:
    refuse("keep_checkpoints", "expected at least 1")
  resolution = config.data.resolution
  if not is_int(resolution) or resolution < 1 or resolution % SIZE_MULTIPLE:
    refuse("data.resolution", f"expected a positive multiple of {SIZE_MULTIPLE}")
  num_eval = config.data.num_eval_examples
  if not is_int(num_eval) or (num_eval < 1 and num_eval != -1):
    refuse("data.num_eval_examples", "expected a positive number, or -1 for all")
  if config.loss.depth_ssim:
    window = config.loss.ssim_window
    if not is_int(window) or window < 1 or window % 2 == 0 or window > resolution:
      refuse("loss.ssim_window", f"expected an odd window of at most data.resolution="
             f"{resolution} pixels")
    if config.loss.get("ssim_form", "reference") not in SSIM_FORMS:
      refuse("loss.ssim_form", f"expected one of {SSIM_FORMS}")


def upgrade_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config as a checkpoint saved it (JSON), in today's keys: how every saved config is read.

  Before issue 14 the original system's data was `data.source="seed"` with `data.seed_layout`
  (now "original" and `data.original_layout`, same contents, so the built dataset is the same),
  and `data.on_device` chose between augmenting in the step and on the host (the step always
  does now; a run that augmented on the host restores its model, not its data stream). Loss
  terms added later (`loss.depth_log_l1`, `loss.depth_aligned_log_l1`) are 0 in a run saved
  before them.
  """
  config = copy.deepcopy(dict(saved))
  data = config.get("data", {})
  if "seed_layout" in data and "original_layout" not in data:
    data["original_layout"] = data.pop("seed_layout")
  if data.get("source") == "seed":
    data["source"] = "original"
  data.pop("on_device", None)
  # Loss terms added since: a run saved before one existed trained without it.
  for term in ("depth_log_l1", "depth_aligned_log_l1"):
    config.setdefault("loss", {}).setdefault(term, 0.0)
  return ml_collections.ConfigDict(config)


def _lookup(config: ml_collections.ConfigDict, dotted_key: str):
  value = config
  for part in dotted_key.split("."):
    value = value[part]
  return value


# The original systems' progressive resizing (SPEC §5): batch size and epochs of each stage, one
# epoch being the original dataset's 280,000 training composites.
ORIGINAL_STAGES = {64: (512, 3), 112: (128, 3), 192: (32, 2)}
ORIGINAL_EPOCH_EXAMPLES = 280_000
# What fits a 2-core CPU: (batch size, steps) of each stage.
CPU_STAGES = {64: (32, 2_400), 112: (16, 1_500), 192: (8, 1_000)}
# The refined stages on a CPU: a refined step costs about 1.5x the model's alone, so a stage
# keeps 2/3 of its steps, except the default run (r64), whose steps fill its 30-minute budget on
# 2 idle cores, data build included (README, "What command 1 gives").
REFINED_CPU_STEPS = {64: 2_600}


# Predecoding the CPU stage's training split is worth it up to this size on disk.
MAX_PREDECODED_BYTES = 4 << 30


def _add_refiner(c: ml_collections.ConfigDict, schedule: str) -> None:
  """The stage's model runs at its resolution inside a refined model twice that size
  (dmjax.models.refiner), so it learns to give sharp outputs at the photo's own size."""
  c.model.refiner = True
  c.model.refiner_window = c.data.resolution * 3 // 4  # 9/64 of the refined size.
  stage = c.data.resolution
  c.data.resolution *= 2  # refiner.REFINE_FACTOR; JAX is not imported by configs.
  full = c.data.resolution + c.data.resolution // 4  # Room for crops of 80 % of the side.
  if schedule == "cpu":
    c.num_train_steps = REFINED_CPU_STEPS.get(stage, c.num_train_steps * 2 // 3)
    c.data.synthetic.resolution = full
    bytes_per_example = full * full * 9  # Two photos, a mask and 16-bit depth.
    c.data.predecoded = c.data.synthetic.num_train * bytes_per_example <= MAX_PREDECODED_BYTES
  else:  # The full-sized sets are rendered at 240 px; larger stages train on upsampled crops.
    c.data.transfer_resolution = min(full, c.data.synthetic.resolution)


def stage_config(resolution: int, arg: str | None) -> ml_collections.ConfigDict:
  """The config of one progressive-resizing stage, with the variant `arg` chooses.

  data=synthetic|original    the built-in scenes, or the original system's dataset layout
                             (SPEC §4) in --config.data.dir=DIR
  recipe=default|original    our model and recipe, or the original's own (faithful model, SGD
                             0.01 momentum 0.9, weight decay 1e-5, ×0.01 step decay every
                             epoch, its losses, no augmentation) for side-by-side comparison
  model=NAME                 another model from dmjax.models (default: depthmasknet_v2, or with
                             recipe=original depthmasknet); with recipe=original, that model's
                             own recipe (ORIGINAL_RECIPES)
  schedule=cpu|full          a run that fits a 2-core CPU, or the originals' 280k-example epochs
                             (GPU)
  refiner=on|off             default recipe: the model at the stage's size inside a refined
                             model twice that size (dmjax.models.refiner), or alone (the previous
                             default: better depth, blurrier masks at large sizes; README)

  `data=seed` and `recipe=seed`, the spellings before issue 14, are refused naming the new one.
  """
  args = parse_arg(arg, data="synthetic", recipe="default", schedule="cpu", model="",
                   refiner="on")
  for key in ("data", "recipe"):
    if args[key] == "seed":
      raise errors.UserError(f"config argument {key}=seed: the original system is now called "
                             f"'original': use {key}=original")
  c = base_config()
  c.data.resolution = resolution
  c.data.source = args.data
  if args.data not in ("synthetic", "original"):
    raise errors.UserError(f"config argument data={args.data!r}: expected synthetic or original")

  if args.schedule == "cpu":
    c.batch_size, c.num_train_steps = CPU_STAGES[resolution]
    c.data.synthetic.resolution = resolution + resolution // 4
    # Predecoded: num_train × rendered side² × 9 bytes (the default run's 160 px: 2.8 GB).
    c.data.predecoded = True
  elif args.schedule == "full":
    c.batch_size, epochs = ORIGINAL_STAGES[resolution]
    c.num_train_steps = epochs * ORIGINAL_EPOCH_EXAMPLES // c.batch_size
    c.data.synthetic.num_train = ORIGINAL_EPOCH_EXAMPLES
    c.data.synthetic.num_test = 10_000
    c.data.synthetic.resolution = 240
    c.data.num_workers = 8
    # Sent at the size the CPU stages render at. Predecoded, 280k examples take 16 GB at 64 px
    # (80² px × 9 bytes each); larger ones are decoded as they are gathered.
    c.data.transfer_resolution = resolution + resolution // 4
    c.data.predecoded = resolution == 64
    if c.data.predecoded:
      # Gathering rows is a copy that one process does fast; worker processes would pass every
      # batch through shared memory, which is several times slower (docs/benchmarks.md,
      # "Feeding the step").
      c.data.num_workers = 0
    c.model.dtype = "bfloat16"  # Tensor cores; parameters, BatchNorm statistics, losses float32.
    c.data.num_eval_examples = 2_048
    # References: `--config.num_train_steps=N` moves these with it.
    c.eval_every_steps = c.get_ref("num_train_steps") // 10
    c.checkpoint_every_steps = c.get_ref("num_train_steps") // 20
    c.log_every_steps = 100
    c.eval_batch_size = 256
  else:
    raise errors.UserError(f"config argument schedule={args.schedule!r}: expected cpu or full")
  if args.refiner not in ("on", "off"):
    raise errors.UserError(f"config argument refiner={args.refiner!r}: expected on or off")
  if args.recipe == "default" and args.refiner == "on":
    _add_refiner(c, args.schedule)

  if args.model:
    from dmjax import models  # noqa: PLC0415  (JAX and Flax, only when a model is named)

    if args.model not in models.MODELS:
      raise errors.UserError(f"config argument model={args.model!r}: expected one of "
                             f"{sorted(models.MODELS)}")
    c.model.name = args.model
  if args.recipe == "original":
    name = args.model or "depthmasknet"  # Without model=, seed 002's model and recipe.
    if name not in ORIGINAL_RECIPES:
      raise errors.UserError(f"config argument recipe=original: {name} has no recipe of its own; "
                             f"models with one: {sorted(ORIGINAL_RECIPES)}")
    c.model.name = name
    c.model.dtype = "float32"  # As the originals trained.
    c.data.augment.enabled = False  # None of the originals augmented.
    c.loss.depth_log_l1 = c.loss.depth_aligned_log_l1 = 0.0  # Ours: none of the originals had
    c.loss.dice_per_image = False  # them, and their Dice ran over the whole batch.
    ORIGINAL_RECIPES[name](c, resolution)
  elif args.recipe != "default":
    raise errors.UserError(f"config argument recipe={args.recipe!r}: expected default or "
                           "original")
  return c


def _depthmasknet_recipe(c: ml_collections.ConfigDict, resolution: int) -> None:
  """depthmasknet (SPEC §5): SGD 0.01, ×0.01 step decay at its epoch ends, BCE + Dice losses."""
  c.optimizer.update(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-5,
                     schedule="step", step_factor=0.01, grad_clip_norm=0.0, warmup_steps=0)
  # Decay where the seed's epochs ended, at the same fractions of the stage, however long
  # `--config.num_train_steps` makes it.
  c.optimizer.step_every = c.get_ref("num_train_steps") // ORIGINAL_STAGES[resolution][1]
  # Its losses (seed 002), on the sigmoid of the logits rather than the raw logits it used.
  c.loss.update(mask_bce=1.0, mask_dice=1.0, depth_l1=1.0, depth_ssim=1.0, depth_edge=0.0,
                depth_bce_dice=1.0, ssim_window=3, ssim_form="kornia2020")


def _unet_dual_recipe(c: ml_collections.ConfigDict, resolution: int) -> None:
  """unet_dual (MODELS.md §1.6–1.8): Adam 1e-3 constant, BCE + IoU mask, SSIM(3) + L1 + Sobel
  edge depth, all weight 1, rgb in [0, 1]."""
  del resolution
  c.model.input_norm = "unit"  # ToTensor without Normalize.
  c.model.decoder_activation = "leaky_relu"  # What the logged run used.
  # Adam(lr 1e-3): its StepLR was created but never stepped, so the rate stayed constant.
  c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=0.0, schedule="step",
                     step_every=0, grad_clip_norm=0.0, warmup_steps=0)
  # The seed computed its IoU term, SSIM, L1 and edge terms on the raw outputs; here all are on
  # sigmoid(logits), as the model's predictions are (BCE was from logits there too). Its SSIM
  # was kornia 0.4.0's, 3x3 with reflect padding.
  c.loss.update(mask_bce=1.0, mask_dice=0.0, mask_iou=1.0, depth_l1=1.0, depth_ssim=1.0,
                ssim_window=3, ssim_form="kornia2020", depth_edge=0.0, depth_sobel_edge=1.0,
                depth_bce_dice=0.0)


def _u2netp_dual_recipe(c: ml_collections.ConfigDict, resolution: int) -> None:
  """u2netp_dual (MODELS.md §2.5–2.6): Adam with a linear one-cycle 1e-3 -> 1e-2 -> 1e-3, BCE on
  the fused and all six side outputs of both tasks (14 terms, weight 1), photos / their max."""
  del resolution
  c.model.input_norm = "image_max"
  c.optimizer.update(name="adamw", learning_rate=1e-2, one_cycle_start=0.1, weight_decay=0.0,
                     schedule="one_cycle", grad_clip_norm=0.0, warmup_steps=0)
  # The seed applied BCE to sigmoid outputs with torch's log clamp at -100; from logits it is the
  # same wherever float32 sigmoid does not saturate (MODELS.md §2.5). Its labels were also divided
  # by their own maxima; ours stay as they are (depth in [0, 1] is absolute here, and evaluation
  # scores against the unscaled labels).
  c.loss.update(mask_bce=1.0, mask_dice=0.0, depth_l1=0.0, depth_ssim=0.0, depth_edge=0.0,
                depth_bce_dice=0.0, depth_bce=1.0, side_bce=1.0)


def _two_stage_recipe(c: ml_collections.ConfigDict, resolution: int) -> None:
  """two_stage (MODELS.md §3.3's proposal): the project's optimizer and augmentation, BCE + Dice
  on the mask, Hu et al.'s depth loss against the ground truth, teacher forcing early on."""
  del resolution
  # The original's Adam 1e-4 was tuned for a mask net against a frozen pretrained depth net;
  # from scratch the proposal keeps the project's recipe.
  default = base_config()
  c.optimizer.update(default.optimizer)
  c.data.augment.enabled = True
  # Hu et al.'s loss on sigmoid(logits): the original's depth output was raw.
  c.loss.update(mask_bce=1.0, mask_dice=1.0, depth_l1=0.0, depth_ssim=0.0, depth_edge=0.0,
                depth_bce_dice=0.0, depth_hu=1.0)
  # Ground-truth masks into stage 2, with a probability annealed from 0.5 to 0 over the first
  # quarter of the steps.
  c.model.teacher_forcing_steps = c.get_ref("num_train_steps") // 4


# Each model's own recipe, `recipe=original` with `model=NAME`: seed 002's, 004's and 003's
# write-ups, and the proposal of MODELS.md §3.3.
ORIGINAL_RECIPES = {"depthmasknet": _depthmasknet_recipe, "unet_dual": _unet_dual_recipe,
                    "u2netp_dual": _u2netp_dual_recipe, "two_stage": _two_stage_recipe}
