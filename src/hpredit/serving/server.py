"""``python -m hpredit.serving.server OWNED ARGV...``: the process ``hpredit serve`` supervises.

``ARGV`` is a ``vllm serve`` command line whose first ``OWNED`` entries are hpredit's
(:func:`~hpredit.serving.serve_argv`); it is parsed with vLLM's own parser, checked
(:func:`~hpredit.serving.check_vllm_args`) and run. A mistake is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import sys

from ..errors import HpreditError
from . import run_vllm_server


def main(args: list[str]) -> int:
    try:
        run_vllm_server(args[1:], int(args[0]))
    except HpreditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
