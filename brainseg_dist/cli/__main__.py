"""``python -m brainseg_dist.cli``: the ``brainseg`` command."""

from brainseg_dist.cli import main

if __name__ == "__main__":
    main()
