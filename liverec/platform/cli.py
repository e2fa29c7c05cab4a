"""The `liverec` command (filled in below)."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("liverec: under construction", file=sys.stderr)
    return 0
