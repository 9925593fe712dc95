"""brainseg-dist: 2D U-Net segmentation of FLAIR abnormalities in brain MRI.

Stages, one module (or subpackage) each, in the order the data walks: ``data`` (scan, split,
decode, cache), ``preprocess``, ``augment``, ``model``, ``train``; and ``checkpoint``,
``pipeline`` (the inference core), then ``evaluate``, ``export`` and ``predict``; ``cli`` on
top. ``tests/test_layering.py`` keeps the imports in that order.
"""

__version__ = "0.1.0"
