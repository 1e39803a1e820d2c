"""Progress lines (rate, ETA, terminal and log output) and the device banner's GPU warning."""

import io
import types

import jax
import pytest

from dmjax import allocator, progress


class Clock:
  """A clock the test moves by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_format_duration_and_rate():
  assert progress.format_duration(0) == "0:00"
  assert progress.format_duration(7.4) == "0:07"
  assert progress.format_duration(754) == "12:34"
  assert progress.format_duration(3723) == "1:02:03"
  assert progress.format_rate(12.4, "frames") == "12 frames/s"
  assert progress.format_rate(3.44, "frames") == "3.4 frames/s"
  assert progress.format_rate(0.4, "frames") == "2.5 s/frame"
  assert progress.format_rate(0.4, "batches") == "2.5 s/batch"


def test_rate_and_eta_are_measured_from_the_first_update():
  clock = Clock()
  bar = progress.Progress("video", total=100, unit="frames", stream=io.StringIO(), clock=clock,
                          tty=False)
  assert bar.rate() is None and bar.eta_s() is None
  clock.now += 30.0  # The first batch of 10 pays for compiling: 30 s.
  bar.advance(10)
  assert bar.rate() == pytest.approx(10 / 30)  # Only the start to go by yet.
  clock.now += 4.0  # Then 20 frames in 4 s: 5 frames/s, 70 frames to go → 14 s.
  bar.advance(20)
  assert bar.rate() == pytest.approx(5.0)
  assert bar.eta_s() == pytest.approx(14.0)
  assert bar.line() == "video: 30/100 frames (30%) | 5.0 frames/s | 0:34 elapsed | ETA 0:14"


def test_unknown_total_has_no_eta():
  clock = Clock()
  bar = progress.Progress("build", unit="scenes", stream=io.StringIO(), clock=clock, tty=False)
  clock.now += 2.0
  bar.advance(40)
  assert bar.eta_s() is None
  assert bar.line() == "build: 40 scenes | 20 scenes/s | 0:02 elapsed"


def test_log_output_is_occasional_lines():
  clock, stream = Clock(), io.StringIO()
  with progress.Progress("predict", total=50, unit="composites", stream=stream, clock=clock,
                         tty=False, every_s=30.0) as bar:
    for _ in range(50):  # One composite a second for 50 s: lines at 1 s and 31 s, then the
      clock.now += 1.0  # summary.
      bar.advance()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert [line.split(" |")[0] for line in lines] == [
      "predict: 1/50 composites (2%)", "predict: 31/50 composites (62%)"] + lines[2:]
  assert lines[2] == "predict: 50/50 composites in 0:50 (1.0 composites/s)"
  assert len(lines) == 3


def test_terminal_output_updates_one_line():
  clock, stream = Clock(), io.StringIO()
  with progress.Progress("video", total=3, unit="frames", stream=stream, clock=clock,
                         tty=True) as bar:
    for _ in range(3):
      clock.now += 1.0
      bar.advance()
  text = stream.getvalue()
  assert text.count("\n") == 1 and text.endswith("\n")  # One line, ended once.
  updates = text.rstrip("\n").split("\r")[1:]
  assert len(updates) == 4  # Three updates and the summary.
  assert updates[-1].rstrip() == "video: 3/3 frames in 0:03 (1.0 frames/s)"
  # Each update covers the whole of the longer one before it.
  assert all(len(b) >= len(a.rstrip()) for a, b in zip(updates, updates[1:], strict=False))


def test_failed_work_prints_no_summary():
  clock, stream = Clock(), io.StringIO()
  with pytest.raises(RuntimeError):
    with progress.Progress("video", total=3, stream=stream, clock=clock, tty=False) as bar:
      clock.now += 1.0
      bar.advance()
      raise RuntimeError
  assert stream.getvalue().splitlines() == ["video: 1/3 items (33%) | 1.0 items/s | 0:01 elapsed "
                                            "| ETA 0:02"]


def test_track_counts_what_the_consumer_takes():
  clock, stream = Clock(), io.StringIO()
  for _ in progress.track(range(4), "render", 4, unit="scenes", stream=stream, clock=clock,
                          tty=False, every_s=1e9):
    clock.now += 0.5
  assert stream.getvalue().splitlines() == [
      "render: 1/4 scenes (25%) | 2.0 scenes/s | 0:00 elapsed | ETA 0:02",
      "render: 4/4 scenes in 0:02 (2.0 scenes/s)"]
  # A consumer that stops early gets no summary.
  stream = io.StringIO()
  for _ in progress.track(range(4), "render", 4, stream=stream, clock=clock, tty=False):
    break
  assert stream.getvalue() == ""


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_describe_devices():
  assert progress.describe_devices([_device("cpu", "cpu")]) == "1 CPU device"
  gpus = [_device("gpu", "NVIDIA H200")] * 2
  assert progress.describe_devices(gpus) == "2 NVIDIA H200 (gpu)"


def test_gpu_warning_only_when_a_present_gpu_goes_unused():
  cpu, gpu = [_device("cpu", "cpu")], [_device("gpu", "NVIDIA H200")]
  assert "JAX sees only the CPU" in progress.gpu_warning(cpu, True, None)
  assert "[cuda]" in progress.gpu_warning(cpu, True, None)
  assert progress.gpu_warning(cpu, True, "cuda,cpu") is not None  # Asked for CUDA, got none.
  assert progress.gpu_warning(cpu, False, None) is None  # No GPU here.
  assert progress.gpu_warning(gpu, True, None) is None  # JAX uses it.
  assert progress.gpu_warning(cpu, True, "cpu") is None  # The user chose the CPU.


def test_device_banner_warns_when_the_gpu_is_unseen(monkeypatch):
  logged = []
  monkeypatch.setattr(progress.logging, "warning", lambda fmt, *a: logged.append(fmt % a))
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert jax.devices()[0].platform == "cpu"  # This test machine's.
  monkeypatch.setattr(progress, "nvidia_gpu_present", lambda: True)
  stream = io.StringIO()
  text = progress.device_banner(stream)
  devices = progress.describe_devices(jax.devices())
  assert text == (f"JAX {jax.__version__} runs on {devices}; allocator: "
                  f"{allocator.describe()}.") == stream.getvalue().strip()
  assert len(logged) == 1 and "JAX sees only the CPU" in logged[0]
  logged.clear()
  monkeypatch.setattr(progress, "nvidia_gpu_present", lambda: False)
  progress.device_banner(io.StringIO())
  assert not logged


def test_gpu_detection_reads_the_driver_and_nvidia_smi(monkeypatch, tmp_path):
  driver = tmp_path / "version"
  monkeypatch.setenv("PATH", str(tmp_path / "bin"))
  assert not progress.nvidia_gpu_present(str(driver))
  driver.write_text("NVRM version: 550\n")
  assert progress.nvidia_gpu_present(str(driver))
  driver.unlink()
  (tmp_path / "bin").mkdir()
  smi = tmp_path / "bin" / "nvidia-smi"
  smi.write_text("#!/bin/sh\n")
  smi.chmod(0o755)
  assert progress.nvidia_gpu_present(str(driver))
