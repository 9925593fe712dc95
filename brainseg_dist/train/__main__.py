"""``accelerate launch -m brainseg_dist.train [options]`` (or ``python -m brainseg_dist.train``):
the options of ``brainseg train``. The command lives in :mod:`brainseg_dist.cli`, on top of
the training package, so nothing below imports the CLI."""

from brainseg_dist.cli import train_command


def main() -> None:
    train_command(prog_name="python -m brainseg_dist.train")


if __name__ == "__main__":
    main()
