"""Run under torchrun by tests/test_distributed.py: one scenario per invocation, results as JSON."""

from __future__ import annotations

import json
import sys
import time

from hpredit import distributed as dist
from hpredit.errors import HpreditError


def main(scenario: str, out: str) -> None:
    assert dist.init(timeout_s=60)
    if scenario == "gather":
        units = list(range(7))
        owned = [u for u in units if dist.owns(u)]
        result = dist.all_gather({"rank": dist.rank(), "owns": owned})
        everyone = dist.all_gather(dist.rank() * 10)
        same = dist.broadcast({"from": dist.rank()})
        bar = dist.progress(len(units), "units", disable=True)
        for _ in owned:
            bar.update(1)
        counted = dist.all_gather(None)  # both ranks have posted their counts
        total = int(bar.store.add(bar.key, 0))
        bar.close()
        assert everyone == [0, 10] and same == {"from": 0} and total == len(units) and counted == [None, None]
        if dist.is_main():
            with open(out, "w") as f:
                json.dump(result, f)
    elif scenario == "fail":
        try:
            with dist.step("collecting"):
                if dist.rank() == 1:
                    raise HpreditError("data.jsonl:3: field 'positive' must be a non-empty string")
                time.sleep(1)  # rank 0 is still working when rank 1 fails
        except HpreditError as e:
            with open(f"{out}.{dist.rank()}", "w") as f:
                f.write(str(e))
            sys.exit(2)
        sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
