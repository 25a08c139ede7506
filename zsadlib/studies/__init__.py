"""Analysis code behind the notebooks: one module per study.

- :mod:`zsadlib.studies.feature_maps`: per-layer similarity maps of a backbone (notebook 01).
- :mod:`zsadlib.studies.dual_branch`: branch-wise metrics, fusion sweeps and the explorer items (notebook 03).
"""
