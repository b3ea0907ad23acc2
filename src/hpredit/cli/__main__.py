"""``python -m hpredit.cli ...``: the same as ``hpredit ...``."""

from . import main

if __name__ == "__main__":
    main()
