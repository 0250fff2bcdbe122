"""Workflows over the stages (what MONAI calls ``monai.apps``): each runs the stage bundles as a user does.

- :mod:`~monai_histodiff.apps.pipeline`: :func:`~monai_histodiff.apps.pipeline.run_stage`, one stage's
  ``python -m monai.bundle run`` command with live output and a log file.
- :mod:`~monai_histodiff.apps.experiment`: the paper's Table 1 protocol (``python -m monai_histodiff experiment``).
- :mod:`~monai_histodiff.apps.demo`: the pipeline end to end on the default data (``make demo``).

Nothing is imported here: ``python -m monai_histodiff`` imports the workflow it runs.
"""
