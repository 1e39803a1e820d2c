"""How well a model does, and how to measure it.

  metrics      the metric collection (mask IoU and Dice, depth errors, checkerboard) and the
               boundary F-score, as jittable sums that merge over batches, devices and hosts
  evaluator    the held-out evaluation step and loop that training runs
  baselines    the |fg_bg − bg| threshold and mean-depth baselines a model has to beat
  split        a saved run's checkpoint on a held-out split, with the worst and best examples
  resolutions  held-out scenes rendered at the size of people's photos
"""
