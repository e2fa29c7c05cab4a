"""Where a benchmark's result goes: one JSON file under benchmarks/results/, and the terminal."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_result(result: dict[str, Any], out: Path, indent: int = 2) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent) + "\n")


def report(result: dict[str, Any], out: Path, print_table: Callable[[dict[str, Any]], None], as_json: bool) -> None:
    """Write the result, then print it as one JSON object (`--json`) or as the table."""
    write_result(result, out)
    if as_json:
        print(json.dumps(result))
    else:
        print_table(result)
        print(f"wrote {out}")
