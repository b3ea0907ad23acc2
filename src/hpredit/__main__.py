"""``python -m hpredit ...``: the command line, also as launched by ``torchrun -m hpredit``."""

from .cli import main

if __name__ == "__main__":
    main()
