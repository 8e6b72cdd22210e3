"""Verifier worker process: reads JSON lines [gold, prediction], writes JSON lines [status, value]."""

import json
import sys

from reward.verify import math_verify_equal


def main() -> None:
    math_verify_equal("1", "1")  # import math-verify and sympy now: seconds that must not count against a check
    sys.stdout.write(json.dumps(["ready", None]) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, prediction = json.loads(line)
        try:
            reply = ["ok", math_verify_equal(gold, prediction)]
        except Exception as e:  # a crash on one input is a result, not the worker's end
            reply = ["error", f"{type(e).__name__}: {e}"]
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
