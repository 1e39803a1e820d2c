"""The command-line tools print the user's mistakes (dmjax.errors.UserError, a missing file) as
one line, and let everything else, a bug, through with its traceback."""

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from dmjax import errors, evaluate, inference, main, predict, train
from dmjax.evaluation import split


def test_main_turns_user_errors_into_one_line_and_lets_bugs_through(tmp_path, monkeypatch):
  def user_mistake(config, workdir):
    raise errors.UserError("config.batch_size=7: a user mistake")

  def bug(config, workdir):
    raise ValueError("a bug deep inside")

  args = ["--config=configs/r64.py", f"--workdir={tmp_path}"]
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(train, "train_and_evaluate", user_mistake)
  with pytest.raises(SystemExit, match="^error: config.batch_size=7: a user mistake$"):
    main.main(args)
  monkeypatch.setattr(train, "train_and_evaluate", bug)
  with pytest.raises(ValueError, match="a bug deep inside"):
    main.main(args)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/r64.py:recipe=seed"], "recipe=seed: .* use recipe=original"),
    (["--config=configs/nothere.py"], "--config=configs/nothere.py: .*No such file"),
    (["--config=configs/r64.py", "--config.data.nothere=1"], "the config has no key .*nothere"),
    (["--config=configs/r64.py", "--config.batch_size=x"], "--config.batch_size=x: invalid"),
])
def test_bad_configs_are_one_line_errors(tmp_path, monkeypatch, args, message):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit, match=f"^error: [^\\n]*{message}[^\\n]*$"):
    main.main([*args, f"--workdir={tmp_path}"])


def test_bad_flags_are_one_line_errors(tmp_path):
  with pytest.raises(SystemExit, match="^error: .*workdir.*see dmjax-predict --help"):
    predict.main([f"--out={tmp_path}"])
  with pytest.raises(SystemExit, match="^error: Unknown command line flag 'nonsense'"):
    predict.main(["--workdir=w", f"--out={tmp_path}", "--nonsense=1"])
  with pytest.raises(SystemExit, match="^error: unexpected arguments"):
    evaluate.main(["--workdir=w", "stray"])



def test_user_error_is_a_value_error():
  assert issubclass(errors.UserError, ValueError)  # `except ValueError` callers still catch it.


def test_evaluate_lets_bugs_through(tmp_path, monkeypatch):
  def bug(*args, **kwargs):
    raise ValueError("a bug deep inside")

  monkeypatch.setattr(split, "evaluate_checkpoint", bug)
  with pytest.raises(ValueError, match="a bug deep inside"):
    evaluate.main([f"--workdir={tmp_path}"])
  monkeypatch.setattr(split, "evaluate_checkpoint", _raise_user_error)
  with pytest.raises(SystemExit, match="^error: config.x=1: a user mistake$"):
    evaluate.main([f"--workdir={tmp_path}"])


def test_predict_lets_bugs_through(tmp_path, monkeypatch):
  image = np.zeros((16, 16, 3), np.uint8)
  for name in ("bg.png", "fg_bg.png"):
    Image.fromarray(image).save(tmp_path / name)
  args = [f"--workdir={tmp_path}", f"--bg={tmp_path / 'bg.png'}",
          f"--fg_bg={tmp_path / 'fg_bg.png'}", f"--out={tmp_path / 'out'}"]

  def bug(*args, **kwargs):
    raise ValueError("a bug deep inside")

  monkeypatch.setattr(inference.Predictor, "from_workdir", bug)
  with pytest.raises(ValueError, match="a bug deep inside"):
    predict.main(args)
  monkeypatch.setattr(inference.Predictor, "from_workdir", _raise_user_error)
  with pytest.raises(SystemExit, match="^error: config.x=1: a user mistake$"):
    predict.main(args)
  # A real one: a missing workdir's checkpoints.
  monkeypatch.undo()
  with pytest.raises(SystemExit, match="no checkpoints here"):
    predict.main(args)


def _raise_user_error(*args, **kwargs):
  raise errors.UserError("config.x=1: a user mistake")
