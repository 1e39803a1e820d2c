"""dmjax.allocator: which allocator a command runs under, and the re-execution that preloads it."""

import os
import subprocess
import sys

import pytest

from dmjax import allocator

MIMALLOC = allocator.find(allocator.PREFERENCE[0])
# What a notebook or a test does: imports dmjax, and is no command.
LIBRARY_IMPORT = ["-c", "import dmjax.allocator as a; print(a.running())"]
# What the `dmjax-X` scripts look like to the package (sys.argv[0] is the script's path).
SCRIPT = ["-c", "import sys; sys.argv[0] = '/bin/dmjax-x'; import dmjax.allocator as a; "
          "print(a.running())"]


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
  environ = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", allocator.ENV, allocator._REEXECUTED_ENV)}
  return subprocess.run([sys.executable, *args], env=dict(environ, **env), check=True,
                        capture_output=True, text=True, timeout=120)


def test_choose_names_paths_and_refusals(tmp_path):
  assert allocator.choose("system") is None
  assert allocator.choose("auto") == next(filter(None, map(allocator.find, allocator.PREFERENCE)),
                                         None)
  library = tmp_path / "libcustom.so"
  library.write_bytes(b"")
  assert allocator.choose(str(library)) == str(library)
  with pytest.raises(allocator.AllocatorError, match="DMJAX_ALLOCATOR='nope': expected auto"):
    allocator.choose("nope")


def test_a_missing_named_allocator_is_one_line(monkeypatch):
  monkeypatch.setattr(allocator, "find", lambda a: None)
  with pytest.raises(allocator.AllocatorError,
                     match="DMJAX_ALLOCATOR=jemalloc: jemalloc is not installed"):
    allocator.choose("jemalloc")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_mimalloc_comes_with_the_requirements():
  assert MIMALLOC and os.path.basename(MIMALLOC).startswith("libmimalloc.so")


@pytest.mark.skipif(MIMALLOC is None, reason="needs cmeel-mimalloc")
def test_commands_reexecute_under_the_allocator_and_library_imports_do_not(tmp_path):
  banner = _run(["-m", "dmjax.progress"]).stderr
  assert "; allocator: mimalloc." in banner
  assert "allocator: the system's malloc (DMJAX_ALLOCATOR=system)" in _run(
      ["-m", "dmjax.progress"], DMJAX_ALLOCATOR="system").stderr
  assert _run(SCRIPT).stdout.strip() == "mimalloc"
  assert _run(LIBRARY_IMPORT).stdout.strip() == "system"
  assert _run(LIBRARY_IMPORT, LD_PRELOAD=MIMALLOC).stdout.strip() == "mimalloc"
  # A library the loader cannot preload is reported once, not re-executed for ever.
  broken = tmp_path / "libbroken.so"
  broken.write_bytes(b"not an ELF file")
  ran = _run(SCRIPT, DMJAX_ALLOCATOR=str(broken))
  assert ran.stdout.strip() == "system" and "libbroken.so" in ran.stderr


@pytest.mark.skipif(MIMALLOC is None or "PYTEST_XDIST_WORKER" not in os.environ,
                    reason="pytest-xdist's workers start under the allocator (conftest.py)")
def test_the_tests_run_under_the_commands_allocator():
  assert allocator.running() == "mimalloc"
