"""The error the user can fix: bad settings, bad files, a workdir that is not what it should be.

The command-line tools print a `UserError` as one line and exit; anything else is a bug (ours or
a library's) and keeps its traceback. It subclasses ValueError, which most of these mistakes
were raised as before it existed.
"""

from __future__ import annotations


class UserError(ValueError):
  """A mistake in the user's settings, data or files, described in one line naming the culprit."""


class NonFiniteLossError(FloatingPointError):
  """Training diverged: the loss became NaN or infinite. The last good checkpoint is kept."""
