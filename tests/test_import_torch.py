"""Importing seed-trained PyTorch weights: same outputs as the PyTorch model, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmjax import checkpoints, import_torch, models  # noqa: E402
from dmjax.models import torch_seed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_PARAMS = 5_230_720


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = torch_seed.DepthMaskNetTorch()
  # Running statistics and affine parameters away from their (0, 1) defaults, so a mix-up of
  # mean/var or scale/bias shows in the outputs.
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        for tensor in (module.running_mean, module.bias):
          tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        for tensor in (module.running_var, module.weight):
          tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
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
  assert weights == set(import_torch.torch_to_flax_keys())
  assert sum(p.numel() for p in torch_model.parameters()) == SEED_PARAMS
  # Spot checks of SPEC §1's key list, written out by hand.
  assert state_dict["encode4.dilatedconv.2.running_var"].shape == (512,)
  assert state_dict["mask_decode1.Pointwise.weight"].shape == (1024, 512, 1, 1)
  assert state_dict["depth_outputConv.weight"].shape == (1, 32, 3, 3)


def test_imported_checkpoint_reproduces_pytorch_outputs(torch_model, state_dict_file, tmp_path):
  import_torch.import_state_dict(state_dict_file, str(tmp_path))
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
  converted = import_torch.convert_state_dict(state_dict)
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
    import_torch.convert_state_dict(state_dict)


def test_command_refuses_a_workdir_with_checkpoints_and_a_missing_file(state_dict_file, tmp_path):
  workdir = tmp_path / "run"
  import_torch.import_state_dict(state_dict_file, str(workdir))
  before = sorted(os.listdir(workdir / "checkpoints"))
  for state_dict, expected in ((state_dict_file, "already holds checkpoints"),
                               (str(tmp_path / "missing.pth"), "missing.pth: no such file")):
    result = subprocess.run(
        [sys.executable, "-m", "dmjax.import_torch", f"--state_dict={state_dict}",
         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
  assert sorted(os.listdir(workdir / "checkpoints")) == before
