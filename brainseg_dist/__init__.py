"""brainseg-dist: 2D U-Net segmentation of FLAIR abnormalities in brain MRI.

Stages, one module each: ``data`` (scan, split, decode, cache), ``augment``,
``model``, ``train``, ``evaluate``, ``export``, ``predict``, ``viz``.
"""

__version__ = "0.1.0"
