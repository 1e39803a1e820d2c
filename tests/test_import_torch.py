"""Importing seed-trained PyTorch weights: same outputs as the PyTorch model, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmjax import checkpoints, models  # noqa: E402
from dmjax.data import schema  # noqa: E402
from dmjax.models import (  # noqa: E402
  torch_depthmasknet,
  torch_u2netp_dual,
  torch_unet_dual,
  torch_weights,  # noqa: E402
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_PARAMS = 5_230_720


def _perturb_batch_norm(model: torch.nn.Module) -> None:
  """Running statistics and affine parameters away from their (0, 1) defaults, so a mix-up of
  mean/var or scale/bias shows in the outputs."""
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        for tensor in (module.running_mean, module.bias):
          tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        for tensor in (module.running_var, module.weight):
          tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = torch_depthmasknet.DepthMaskNetTorch()
  _perturb_batch_norm(model)
  with torch.no_grad():
    # The linear heads shrink their input to logits of std ~0.005 at PyTorch's initialisation;
    # scaled to std ~0.5, an absolute 1e-4 is a strict comparison.
    for task in ("mask", "depth"):
      getattr(model, f"{task}_outputConv").weight.mul_(100.0)
  return model.eval()


@pytest.fixture(scope="module")
def state_dict_file(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("pth") / "seed.pth"
  torch.save(torch_model.state_dict(), path)
  return str(path)


def test_transcription_has_the_original_keys_and_size(torch_model):
  state_dict = torch_model.state_dict()
  weights = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  assert weights == set(torch_weights.torch_to_flax_keys())
  assert sum(p.numel() for p in torch_model.parameters()) == SEED_PARAMS
  # Spot checks of SPEC §1's key list, written out by hand.
  assert state_dict["encode4.dilatedconv.2.running_var"].shape == (512,)
  assert state_dict["mask_decode1.Pointwise.weight"].shape == (1024, 512, 1, 1)
  assert state_dict["depth_outputConv.weight"].shape == (1, 32, 3, 3)


def test_imported_checkpoint_reproduces_pytorch_outputs(torch_model, state_dict_file, tmp_path):
  torch_weights.import_state_dict(state_dict_file, str(tmp_path))
  config, variables, step = checkpoints.restore_model(str(tmp_path))
  assert (config.model.name, step) == ("depthmasknet", 0)

  rng = np.random.default_rng(0)
  bg, fg_bg = (rng.normal(size=(2, 3, 48, 32)).astype(np.float32) for _ in range(2))
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(bg), torch.from_numpy(fg_bg))
  model = models.create_model(config.model)
  outputs = model.apply(variables, bg.transpose(0, 2, 3, 1), fg_bg.transpose(0, 2, 3, 1),
                        train=False)
  for task, torch_logits in zip(("mask", "depth"), expected, strict=True):
    want = torch_logits.numpy().transpose(0, 2, 3, 1)
    assert np.std(want) > 0.1  # Not a comparison of two near-constant maps.
    np.testing.assert_allclose(np.asarray(outputs[task]), want, rtol=0, atol=1e-4)


def test_data_parallel_prefix_and_wrapped_dicts_are_accepted(torch_model):
  state_dict = {f"module.{k}": v for k, v in torch_model.state_dict().items()}
  converted = torch_weights.convert_state_dict(state_dict)
  np.testing.assert_array_equal(converted["params"]["merge"]["kernel"],
                                torch_model.pointwise.weight.detach().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update({"extra.weight": torch.zeros(3)}), r"'extra.weight' is not a weight"),
    (lambda d: d.pop("encode2.Pointwise.weight"), r"lacks key 'encode2.Pointwise.weight'"),
    (lambda d: d.update({"bg.1.running_mean": torch.zeros(16)}),
     r"'bg.1.running_mean': expected shape \(32,\), got \(16,\)"),
])
def test_bad_state_dicts_name_the_key(torch_model, change, message):
  state_dict = dict(torch_model.state_dict())
  change(state_dict)
  with pytest.raises(ValueError, match=message):
    torch_weights.convert_state_dict(state_dict)


def test_command_refuses_a_workdir_with_checkpoints_and_a_missing_file(state_dict_file, tmp_path):
  workdir = tmp_path / "run"
  torch_weights.import_state_dict(state_dict_file, str(workdir))
  before = sorted(os.listdir(workdir / "checkpoints"))
  for state_dict, expected in ((state_dict_file, "already holds checkpoints"),
                               (str(tmp_path / "missing.pth"), "missing.pth: no such file")):
    result = subprocess.run(
        [sys.executable, "-m", "dmjax.import_torch", f"--state_dict={state_dict}",
         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
  assert sorted(os.listdir(workdir / "checkpoints")) == before


# The other seeds (MODELS.md §1, §2): transcriptions written from the specification.
OTHER_SEEDS = {
    # name: (PyTorch model, parameters, state-dict keys, input size (H, W), output convs scaled
    # so that logits have a spread of ~1 rather than ~0.02 at PyTorch's initialisation).
    "unet_dual": (torch_unet_dual.UNetDualTorch, 3_165_170, 152, (36, 28),
                  ("decoder_m.conv3", "decoder_d.conv3")),
    "u2netp_dual": (torch_u2netp_dual.U2NetPDualTorch, 1_769_306, 1_176, (37, 30),
                    tuple(f"{task}_side{k}" for task in ("depth", "seg") for k in range(1, 7))),
}


@pytest.fixture(scope="module", params=sorted(OTHER_SEEDS))
def other_seed(request, tmp_path_factory):
  """(name, PyTorch model in eval mode, its saved .pth)."""
  name = request.param
  torch_class, _, _, _, output_convs = OTHER_SEEDS[name]
  torch.manual_seed(0)
  model = torch_class()
  _perturb_batch_norm(model)
  with torch.no_grad():
    for conv_name in output_convs:
      model.get_submodule(conv_name).weight.mul_(30.0)
      model.get_submodule(conv_name).bias.mul_(30.0)
  path = tmp_path_factory.mktemp("pth") / f"{name}.pth"
  torch.save(model.state_dict(), path)
  return name, model.eval(), str(path)


def test_other_transcriptions_have_the_original_keys_and_sizes(other_seed):
  name, model, _ = other_seed
  _, num_params, num_keys, _, _ = OTHER_SEEDS[name]
  state_dict = model.state_dict()
  assert len(state_dict) == num_keys
  assert sum(p.numel() for p in model.parameters()) == num_params
  weights = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  assert weights == set(torch_weights.torch_to_flax_keys(name))
  # Spot checks of MODELS.md §1.4 and §2.4, written out by hand.
  expected = {"unet_dual": {"encoder.layer4.0.shortcut.0.weight": (256, 128, 1, 1),
                            "decoder_d.up1.up.weight": (128, 128, 2, 2),
                            "decoder_m.up2.convA.weight": (16, 96, 3, 3)},
              "u2netp_dual": {"stage1.rebnconvin.conv_s1.weight": (64, 6, 3, 3),
                              "seg_stage1d.rebnconv6d.bn_s1.running_var": (16,),
                              "depth_out.weight": (1, 6, 1, 1)}}[name]
  assert {k: tuple(state_dict[k].shape) for k in expected} == expected


def _seed_inputs(name: str, bg: np.ndarray, fg_bg: np.ndarray) -> torch.Tensor:
  """What the seed's own data pipeline fed its model for these dataset-standardised photos."""
  photos = []
  for key, image in (("bg", bg), ("fg_bg", fg_bg)):
    rgb = image * np.array(schema.PHOTO_STD[key]) + np.array(schema.PHOTO_MEAN[key])
    if name == "u2netp_dual":  # img / np.max(img)
      rgb = rgb / rgb.max(axis=(1, 2, 3), keepdims=True)
    photos.append(rgb.astype(np.float32).transpose(0, 3, 1, 2))
  return torch.from_numpy(np.concatenate(photos, axis=1))


def _compare(got: np.ndarray, want: torch.Tensor) -> None:
  want = want.numpy().transpose(0, 2, 3, 1)
  assert np.std(want) > 0.1  # Not a comparison of two near-constant maps.
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


def test_imported_other_seed_reproduces_pytorch_outputs(other_seed, tmp_path):
  name, torch_model, path = other_seed
  torch_weights.import_state_dict(path, str(tmp_path), model_name=name)
  config, variables, step = checkpoints.restore_model(str(tmp_path))
  assert (config.model.name, step) == (name, 0)
  assert config.data.resolution == {"unet_dual": 64, "u2netp_dual": 224}[name]
  assert config.model.input_norm == {"unet_dual": "unit", "u2netp_dual": "image_max"}[name]

  height, width = OTHER_SEEDS[name][3]
  rng = np.random.default_rng(0)
  bg, fg_bg = (rng.uniform(-2, 1, (2, height, width, 3)).astype(np.float32) for _ in range(2))
  with torch.no_grad():
    expected = torch_model(_seed_inputs(name, bg, fg_bg))
  outputs = models.create_model(config.model).apply(variables, bg, fg_bg, train=False)
  if name == "unet_dual":
    for task, want in zip(("mask", "depth"), expected, strict=True):
      _compare(outputs[task], want)
    # The stored code's ReLU decoder: same weights, both sides switched.
    relu_torch = torch_unet_dual.UNetDualTorch(leaky=False)
    relu_torch.load_state_dict(torch_model.state_dict())
    with torch.no_grad():
      expected = relu_torch.eval()(_seed_inputs(name, bg, fg_bg))
    config.model.decoder_activation = "relu"
    outputs = models.create_model(config.model).apply(variables, bg, fg_bg, train=False)
    for task, want in zip(("mask", "depth"), expected, strict=True):
      _compare(outputs[task], want)
  else:  # (depth fused, depth side 1..6, seg fused, seg side 1..6).
    for task, first in (("depth", 0), ("mask", 7)):
      _compare(outputs[task], expected[first])
      for k in range(6):
        _compare(outputs[f"{task}_sides"][..., k:k + 1], expected[first + 1 + k])


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update({"seg_side7.weight": torch.zeros(1, 64, 3, 3)}),
     r"'seg_side7.weight' is not a weight of seed 003's U2NETP"),
    (lambda d: d.pop("depth_stage4d.rebnconv3d.bn_s1.running_mean"),
     r"lacks key 'depth_stage4d.rebnconv3d.bn_s1.running_mean' \(expected shape \(16,\)\)"),
    (lambda d: d.update({"stage2.rebnconv1.conv_s1.weight": torch.zeros(16, 64, 1, 1)}),
     r"'stage2.rebnconv1.conv_s1.weight': expected shape \(16, 64, 3, 3\), got \(16, 64, 1, 1\)"),
])
def test_bad_u2netp_state_dicts_name_the_key(change, message):
  state_dict = dict(torch_u2netp_dual.U2NetPDualTorch().state_dict())
  change(state_dict)
  with pytest.raises(ValueError, match=message):
    torch_weights.convert_state_dict(state_dict, "u2netp_dual")


def test_models_without_an_original_are_refused(state_dict_file, tmp_path):
  with pytest.raises(ValueError, match=r"--model=two_stage: weights import for"):
    torch_weights.import_state_dict(state_dict_file, str(tmp_path), model_name="two_stage")
