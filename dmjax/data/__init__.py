"""Data: sources of (bg, fg_bg, mask, depth) quartets and the grain input pipeline."""
