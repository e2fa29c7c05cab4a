"""`liverec demo` runs against its own broker, reports per-topic counts, and leaves nothing running."""

import re
import subprocess
import sys


def test_demo_replays_and_counts_and_cleans_up() -> None:
    out = subprocess.run([sys.executable, "-m", "liverec.platform", "demo", "--limit", "3000"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    port = re.search(r"broker: 127\.0\.0\.1:(\d+)", out.stdout).group(1)
    counts = dict(re.findall(r"^(liverec\.\S+)\s+(\d+)$", out.stdout, re.M))
    assert counts["liverec.events"] == "3000"
    assert set(counts) == {"liverec.events", "liverec.events.dlq", "liverec.user-state", "liverec.params"}
    listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    assert f":{port} " not in listening
