"""dmjax.export: jax.export files equal to the model in process, loadable with jax alone, refused
when damaged or of another model; ONNX through jax2onnx where the optional extra is installed."""

import functools
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO, run_command
from jax import export as jax_export
from PIL import Image

from dmjax import checkpoints, errors, export, models, predict
from dmjax import config as config_lib
from dmjax.data import schema
from dmjax.inference import Predictor, exported


def make_run(directory, *, refiner: bool, resolution: int) -> str:
  """A depthmasknet_v2 run (with or without a refiner) at perturbed initial weights: the
  refiner's last conv starts at zero, and a test should see it act."""
  config = config_lib.base_config()
  config.model.refiner = refiner
  config.data.resolution = resolution
  model = models.create_model(config.model)
  images = np.zeros((1, resolution, resolution, 3), np.float32)
  variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(0), images, images))
  rng = np.random.default_rng(0)
  variables["params"] = jax.tree.map(
      lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype), variables["params"])
  workdir = str(directory)
  checkpoints.save_imported_model(workdir, config, variables)
  return workdir


def pairs(batch, height, width, seed=0):
  """Smooth random backgrounds, and the same with a bright rectangle pasted in: uint8."""
  rng = np.random.default_rng(seed)
  bgs = []
  for _ in range(batch):
    small = rng.integers(0, 256, (4, 4, 3), np.uint8)
    bgs.append(np.asarray(Image.fromarray(small).resize((width, height),
                                                        Image.Resampling.BILINEAR)))
  bg = np.stack(bgs)
  fg_bg = bg.copy()
  fg_bg[:, height // 4:height // 2, width // 3:width * 2 // 3] = (250, 240, 30)
  return bg, fg_bg


@functools.cache
def restored(workdir):
  """The checkpoint's model as a jitted `models.predict_probabilities`, and its variables."""
  config, variables, _ = checkpoints.restore_model(workdir)
  model = models.create_model(config.model)
  return jax.jit(functools.partial(models.predict_probabilities, model)), variables


def in_process(workdir, bg, fg_bg):
  """What the model gives in this process, from the checkpoint, on normalised photos."""
  predict_probabilities, variables = restored(workdir)
  mask, depth = predict_probabilities(variables, schema.normalize_photo(bg, "bg"),
                                      schema.normalize_photo(fg_bg, "fg_bg"))
  return np.asarray(mask), np.asarray(depth)


@pytest.fixture(scope="module")
def refined_run(tmp_path_factory):
  return make_run(tmp_path_factory.mktemp("refined_run"), refiner=True, resolution=64)


@pytest.fixture(scope="module")
def refined_file(refined_run, tmp_path_factory):
  """The refined run exported by the command, as a user would."""
  path = str(tmp_path_factory.mktemp("exported") / "refined.jaxexport")
  assert run_command(export.main, f"--workdir={refined_run}", f"--out={path}") is None
  return path


def test_exported_function_equals_the_model(refined_run, refined_file):
  model = exported.load(refined_file)
  metadata = model.metadata
  assert metadata["model"] == "depthmasknet_v2" and metadata["refiner"] is True
  assert metadata["checkpoint_step"] == 0 and metadata["platforms"] == ["cpu", "cuda"]
  assert metadata["input_shape"] == "b, 32*h, 32*w, 3"  # Symbolic batch, height and width.
  assert metadata["resolution_policy"]["training_resolution"] == 64
  assert metadata["resolution_policy"]["fixed_size"] is None
  assert metadata["normalization"]["mean"]["bg"] == list(schema.PHOTO_MEAN["bg"])
  assert metadata["jax_version"] == jax.__version__
  # Two sizes, two batch sizes; neither size is the training size's shape.
  for batch, height, width in ((1, 96, 64), (3, 32, 128)):
    bg, fg_bg = pairs(batch, height, width, seed=batch)
    mask, depth = model(bg, fg_bg)
    expected_mask, expected_depth = in_process(refined_run, bg, fg_bg)
    assert mask.shape == depth.shape == (batch, height, width, 1)
    np.testing.assert_allclose(mask, expected_mask, rtol=0, atol=1e-5)
    np.testing.assert_allclose(depth, expected_depth, rtol=0, atol=1e-5)
    assert mask.std() > 1e-3 and depth.std() > 1e-3  # Not a constant the two would share.


def test_unrefined_model_takes_multiples_of_16(tmp_path):
  workdir = make_run(tmp_path / "run", refiner=False, resolution=32)
  model = exported.export_run(workdir, platforms=("cpu",))
  assert model.metadata["input_shape"] == "b, 16*h, 16*w, 3" and model.size_multiple == 16
  bg, fg_bg = pairs(2, 16, 48)
  for got, expected in zip(model(bg, fg_bg), in_process(workdir, bg, fg_bg), strict=True):
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  with pytest.raises(errors.UserError, match="multiples of 16; got 24x48"):
    model(*pairs(1, 24, 48))


class NeedsConcreteHeight(nn.Module):
  """A model whose code needs the height as a number: no symbolic export."""

  @nn.compact
  def __call__(self, bg, fg_bg, train=False):
    rows = np.linspace(0.0, 1.0, int(bg.shape[1]), dtype=np.float32)[None, :, None, None]
    x = nn.Conv(2, (3, 3))(fg_bg - bg) + rows
    return {"mask": x[..., :1], "depth": x[..., 1:]}


def test_model_without_symbolic_sizes_is_exported_at_its_training_size(tmp_path, caplog):
  model = NeedsConcreteHeight()
  images = np.zeros((1, 16, 16, 3), np.float32)
  variables = model.init(jax.random.PRNGKey(1), images, images)
  with caplog.at_level(logging.WARNING, logger="absl"):
    result = exported.export_model(model, variables, model_name="concrete", resolution=16,
                                   platforms=("cpu",))
  log = [record.getMessage() for record in caplog.records]
  assert result.fixed_size == (16, 16) and result.metadata["input_shape"] == "b, 16, 16, 3"
  assert any("cannot be exported with symbolic height and width" in line and "16x16" in line
             for line in log)
  for batch in (2, 3):  # The batch stays symbolic.
    bg, fg_bg = pairs(batch, 16, 16)
    expected = models.predict_probabilities(model, variables, schema.normalize_photo(bg, "bg"),
                                            schema.normalize_photo(fg_bg, "fg_bg"))
    for got, want in zip(result(bg, fg_bg), expected, strict=True):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  with pytest.raises(errors.UserError, match="fixed size of 16x16; got 32x32"):
    result(*pairs(1, 32, 32))
  path = str(tmp_path / "fixed.jaxexport")
  exported.save(result, path)
  with pytest.raises(errors.UserError, match="runs with fit=resize only"):
    Predictor.from_exported(path, fit="pad")
  predictor = Predictor.from_exported(path)  # auto: resize to 16x16 and back.
  bg, fg_bg = pairs(1, 20, 24)
  mask, _ = predictor(bg[0], fg_bg[0])
  assert predictor.fit == "resize" and mask.shape == (20, 24)


def test_predictor_and_predict_command_run_the_file(refined_run, refined_file, tmp_path):
  bg, fg_bg = pairs(2, 37, 50)  # Not multiples of 32: padded (pad) or resized (resize).
  for fit in ("pad", "resize"):
    from_file = Predictor.from_exported(refined_file, fit=fit, batch_size=2)
    from_run = Predictor.from_workdir(refined_run, fit=fit, batch_size=2)
    for got, expected in zip(from_file(bg, fg_bg), from_run(bg, fg_bg), strict=True):
      assert got.shape == (2, 37, 50)
      np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  # auto: the same two passes; the file's photos are rounded to uint8 at the working size.
  bg, fg_bg = pairs(1, 150, 200)
  from_file = Predictor.from_exported(refined_file, batch_size=1)
  from_run = Predictor.from_workdir(refined_run, batch_size=1)
  assert from_file.fit == "auto"
  assert from_file.working_sizes(150, 200) == from_run.working_sizes(150, 200)
  for got, expected in zip(from_file(bg, fg_bg), from_run(bg, fg_bg), strict=True):
    assert got.shape == (1, 150, 200)
    np.testing.assert_allclose(got, expected, rtol=0, atol=0.02)
  with pytest.raises(errors.UserError, match=re.escape(f"{refined_file}: exported from model "
                                                       "'depthmasknet_v2', not 'unet_dual'")):
    Predictor.from_exported(refined_file, expect_model="unet_dual")
  # The command: the same PNGs from the file as from the run.
  bg_path, fg_bg_path = str(tmp_path / "bg.png"), str(tmp_path / "scene.png")
  Image.fromarray(bg[0]).save(bg_path)
  Image.fromarray(fg_bg[0]).save(fg_bg_path)
  for source, out in ((f"--exported={refined_file}", "from_file"),
                      (f"--workdir={refined_run}", "from_run")):
    assert run_command(predict.main, source, f"--bg={bg_path}", f"--fg_bg={fg_bg_path}",
                        "--fit=resize", f"--out={tmp_path / out}") is None
  for name in ("scene_mask.png", "scene_depth.png"):
    with Image.open(tmp_path / "from_file" / name) as a, Image.open(tmp_path / "from_run" /
                                                                     name) as b:
      assert np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() <= 1
  message = run_command(predict.main, f"--exported={refined_file}", f"--workdir={refined_run}",
                         f"--bg={bg_path}", f"--fg_bg={fg_bg_path}", f"--out={tmp_path / 'x'}")
  assert "Exactly one of (workdir, exported)" in message and "\n" not in message


# Run in a fresh interpreter: Flax and PIL (and, for the README's recipe, dmjax) cannot be
# imported.
LOAD_WITHOUT_FLAX = """
import importlib.abc, os, sys
BLOCKED = {"flax", "PIL", "dmjax"}

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED or name.startswith("dmjax.models"):
      raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
    return None

sys.meta_path.insert(0, Block())
import numpy as np
inputs = np.load(os.environ["INPUTS"])
bg, fg_bg = inputs["bg"], inputs["fg_bg"]
exec(os.environ["README_RECIPE"])
assert "dmjax" not in sys.modules and "flax" not in sys.modules
readme_outputs = (np.asarray(mask), np.asarray(depth))

BLOCKED.discard("dmjax")
from dmjax.inference import exported
model = exported.load(os.environ["MODEL"])
outputs = model(bg, fg_bg)
assert not {"flax", "PIL", "dmjax.models"} & set(sys.modules), sorted(sys.modules)
np.savez(os.environ["OUTPUTS"], readme_mask=readme_outputs[0], readme_depth=readme_outputs[1],
         mask=outputs[0], depth=outputs[1])
"""


def readme_recipe(path: str) -> str:
  """The README's plain-JAX loading code, reading `path`."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  blocks = re.findall(r"```python\n(# Plain JAX.*?)```", readme, re.DOTALL)
  assert len(blocks) == 1, "README: no (or more than one) '# Plain JAX' python block"
  assert '"model.jaxexport"' in blocks[0]
  return blocks[0].replace('"model.jaxexport"', repr(path))


def test_loads_with_jax_alone(refined_run, refined_file, tmp_path):
  bg, fg_bg = pairs(2, 64, 32, seed=5)
  np.savez(tmp_path / "inputs.npz", bg=bg, fg_bg=fg_bg)
  env = dict(os.environ, JAX_PLATFORMS="cpu", INPUTS=str(tmp_path / "inputs.npz"),
             OUTPUTS=str(tmp_path / "outputs.npz"), MODEL=refined_file,
             README_RECIPE=readme_recipe(refined_file))
  result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FLAX], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = np.load(tmp_path / "outputs.npz")
  expected_mask, expected_depth = in_process(refined_run, bg, fg_bg)
  for prefix in ("", "readme_"):
    np.testing.assert_allclose(outputs[prefix + "mask"][..., 0], expected_mask[..., 0], atol=1e-5)
    np.testing.assert_allclose(outputs[prefix + "depth"][..., 0], expected_depth[..., 0],
                               atol=1e-5)


def damaged(path, tmp_path, name, edit) -> str:
  with open(path, "rb") as f:
    data = f.read()
  target = str(tmp_path / name)
  with open(target, "wb") as f:
    f.write(edit(data))
  return target


def flip_byte(data: bytes, index: int) -> bytes:
  return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]


def test_bad_files_give_one_line_errors(refined_file, tmp_path):
  payload = bytes(exported.load(refined_file).exported.serialize())
  cases = {
      damaged(refined_file, tmp_path, "truncated", lambda d: d[:-1000]): "truncated or damaged",
      damaged(refined_file, tmp_path, "flipped", lambda d: flip_byte(d, len(d) - 5000)):
          "do not match their SHA-256",
      damaged(refined_file, tmp_path, "header_cut", lambda d: d[:200]): "corrupt metadata line",
      damaged(refined_file, tmp_path, "empty", lambda d: b""): "not a dmjax exported model",
      damaged(refined_file, tmp_path, "bare", lambda d: payload): "not a dmjax exported model",
      damaged(refined_file, tmp_path, "version", lambda d: d.replace(b" 1\n", b" 7\n", 1)):
          "format version '7'",
      str(tmp_path / "missing"): "cannot read it",
  }
  # A header that matches its payload, but the payload is not a jax.export serialization.
  junk = b"\0" * 64
  header = {**exported.load(refined_file).metadata, "payload_size": len(junk),
            "payload_sha256": __import__("hashlib").sha256(junk).hexdigest()}
  not_jax = tmp_path / "not_jax"
  not_jax.write_bytes(b"dmjax-exported-model 1\n" + json.dumps(header).encode() + b"\n" + junk)
  cases[str(not_jax)] = "cannot read the model it holds"
  for path, problem in cases.items():
    with pytest.raises(errors.UserError) as info:
      exported.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message
  # The command refuses to replace a file, in one line.
  message = run_command(export.main, "--workdir=unused", f"--out={refined_file}")
  assert message == f"error: {refined_file} exists; choose another --out or pass --overwrite"
  bg, fg_bg = pairs(1, 32, 32)
  Image.fromarray(bg[0]).save(tmp_path / "bg.png")
  Image.fromarray(fg_bg[0]).save(tmp_path / "scene.png")
  message = run_command(predict.main, f"--exported={tmp_path / 'truncated'}",
                         f"--bg={tmp_path / 'bg.png'}", f"--fg_bg={tmp_path / 'scene.png'}",
                         f"--out={tmp_path / 'out'}")
  assert message.startswith("error: ") and "truncated or damaged" in message


# The `onnx` extra; CI installs it, so there a missing one fails instead of skipping.
ONNX_MISSING = (not os.environ.get("CI") and (importlib.util.find_spec("jax2onnx") is None
                                              or importlib.util.find_spec("onnxruntime") is None))


@pytest.mark.slow  # About 40 s on 2 cores: jax2onnx converts for 10-15 s, twice.
@pytest.mark.skipif(ONNX_MISSING, reason='jax2onnx/onnxruntime not installed (the optional '
                    '"onnx" extra: pip install -c constraints.txt -e ".[onnx]")')
def test_onnx_equals_the_model(tmp_path, refined_run):
  import onnx  # noqa: PLC0415
  import onnxruntime  # noqa: PLC0415

  workdir = make_run(tmp_path / "run", refiner=False, resolution=32)
  path = tmp_path / "model.onnx"
  assert run_command(export.main, f"--workdir={workdir}", f"--out={path}", "--size=32,48") is None
  proto = onnx.load(str(path))
  properties = {p.key: json.loads(p.value) for p in proto.metadata_props}
  assert properties["model"] == "depthmasknet_v2" and properties["checkpoint_step"] == 0
  assert properties["resolution_policy"]["fixed_size"] == [32, 48] and properties["batch"] == "any"
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  for batch in (1, 3):
    bg, fg_bg = pairs(batch, 32, 48, seed=batch)
    mask, depth = session.run(["mask", "depth"], {"bg": bg, "fg_bg": fg_bg})
    expected_mask, expected_depth = in_process(workdir, bg, fg_bg)
    np.testing.assert_allclose(mask, expected_mask, rtol=0, atol=1e-4)
    np.testing.assert_allclose(depth, expected_depth, rtol=0, atol=1e-4)
  # The refined models use an antialiased resize that jax2onnx does not convert: one line.
  message = run_command(export.main, f"--workdir={refined_run}", f"--out={tmp_path / 'r.onnx'}")
  assert "cannot convert depthmasknet_v2 with a refiner" in message and "antialias" in message
  assert "\n" not in message
  assert not os.path.exists(tmp_path / "r.onnx")


def test_symbolic_shape_is_what_jax_export_says(refined_file):
  # The metadata's shape is the deserialized function's own, not a string of ours.
  model = exported.load(refined_file)
  shape = model.exported.in_avals[0].shape
  assert all(jax_export.is_symbolic_dim(d) for d in shape[:3]) and shape[3] == 3


def test_the_file_names_its_run_but_holds_no_path_of_the_exporter(refined_run, refined_file):
  with open(refined_file, "rb") as f:
    f.readline()
    header = f.readline().decode()
  metadata = json.loads(header)
  assert metadata["run"] == os.path.basename(refined_run)
  # Neither the workdir's path nor any folder above it (user names, mount points) is in it.
  for folder in (os.path.abspath(refined_run), os.path.dirname(os.path.abspath(refined_run))):
    assert folder not in header
  assert "workdir" not in metadata


def with_metadata(path, tmp_path, name, **changes) -> str:
  """A copy of an exported file with metadata values replaced (the payload intact)."""
  with open(path, "rb") as f:
    magic, header, payload = f.readline(), json.loads(f.readline()), f.read()
  for key, value in changes.items():
    parent = header
    *parents, last = key.split(".")
    for part in parents:
      parent = parent[part]
    parent[last] = value
  target = tmp_path / name
  target.write_bytes(magic + json.dumps(header).encode() + b"\n" + payload)
  return str(target)


@pytest.mark.parametrize("key, value, words", [
    ("resolution_policy", None, "metadata resolution_policy is null, not an object"),
    ("resolution_policy.size_multiple", "16", "resolution_policy.size_multiple is a string, not "
                                              "a whole number"),
    ("resolution_policy.fixed_size", [64], "fixed_size is an array, not [height, width] or null"),
    ("refiner", "yes", "metadata refiner is a string, not true or false"),
    ("checkpoint_step", True, "checkpoint_step is a boolean, not a whole number or null"),
    ("platforms", None, "metadata platforms is null, not an array of strings"),
    ("model", 7, "metadata model is the number 7, not a string"),
])
def test_metadata_of_the_wrong_type_is_a_one_line_error(key, value, words, refined_file,
                                                        tmp_path):
  path = with_metadata(refined_file, tmp_path, "typed.jaxexport", **{key: value})
  with pytest.raises(errors.UserError) as info:
    Predictor.from_exported(path)
  message = str(info.value)
  assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message
