"""The conformance scripts' harness: run each check, print one line for it, and exit
non-zero at the end if any failed."""

import sys

passed, failed = 0, 0


def check(name, fn):
    """Runs `fn`; its return value is the detail printed with `ok`."""
    global passed, failed
    try:
        detail = fn()
        passed += 1
        print(f"ok   {name}: {detail}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")


def finish():
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
