"""Data, in the order it flows: sources → built dataset → host pipeline → train step.

  synthetic/            the built-in scenes' renderer (`render_example`)
  original_layout.py    reader of the original system's dataset layout (SPEC §4)
  write_original_layout.py  built-in scenes written in that layout
  tfds_builder.py, sources.py  the TFDS datasets `config.data.source` names, built once
  pipeline.py           grain: training batches of stored uint8 examples; evaluation batches
  augment.py            what the train step does to a stored batch: augment, resize, normalise
  schema.py             what an example is, whichever source it comes from
  render_samples.py     renders a few scenes to PNG files, to look at them
"""
