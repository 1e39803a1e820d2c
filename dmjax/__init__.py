"""dmjax: foreground mask and dense depth from a (background, composite) photo pair."""

from dmjax import allocator as _allocator

__version__ = "0.1.0"

# A command (not a library import) first re-executes under a caching allocator: dmjax.allocator.
if _allocator.is_command():
  _allocator.run_command()
