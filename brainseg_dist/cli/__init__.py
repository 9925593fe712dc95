"""``brainseg``: a thin click CLI over the library, for inspection and single-device runs.

One module per kind of command; importing them registers them on :data:`main`.
"""

from brainseg_dist.cli import dataset, results, training
from brainseg_dist.cli.base import main, reports_errors
from brainseg_dist.cli.training import cv_command, parse_set_options, train_command

__all__ = ["cv_command", "dataset", "main", "parse_set_options", "reports_errors", "results",
           "train_command", "training"]
