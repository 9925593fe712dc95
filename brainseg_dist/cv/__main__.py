"""``accelerate launch -m brainseg_dist.cv [options]``: the options of ``brainseg cv``. The
command lives in :mod:`brainseg_dist.cli`, on top of the package, so nothing below imports the
CLI."""

from brainseg_dist.cli import cv_command


def main() -> None:
    cv_command(prog_name="python -m brainseg_dist.cv")


if __name__ == "__main__":
    main()
