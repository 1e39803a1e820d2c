"""dmjax: foreground mask and dense depth from a (background, composite) photo pair."""

__version__ = "0.1.0"
