"""Where a benchmark's result goes: one JSON file under benchmarks/results/, and the terminal."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a VM may show only "AMD EPYC"; the
    numbers name the generation), from /proc/cpuinfo; the architecture where there is none. The
    shared 2-core VMs come from a pool of hosts, and one benchmark moved 1.5x from one host to
    another on the same day: a result says which CPU it came from."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if not name.strip():
                break  # the first processor's block is enough
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
    return fields["model name"] + numbers


def machine() -> str:
    """One line for a result: host, architecture, cores, CPU model, GPU (if torch sees one), torch."""
    import torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, {cpu_model()}{gpu}, "
            f"torch {torch.__version__})")


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
