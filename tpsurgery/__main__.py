"""``python -m tpsurgery`` and ``torchrun --nproc-per-node=N -m tpsurgery ...``: the ``tpsurgery`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
