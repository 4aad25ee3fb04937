"""The docker-free runtime check enforces what Grand Challenge enforces: a probe run inside
scripts/sandbox_run.sh must fail to write its input, reach the network or run as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import JOBS, REPO

PROBE = r"""
import json, os, resource, socket, sys
inp, out = sys.argv[1], sys.argv[2]
report = {"uid": os.getuid()}
try:
    open(os.path.join(inp, "written-by-job.txt"), "w").write("x")
    report["write_input"] = "ok"
except OSError as err:
    report["write_input"] = type(err).__name__
try:
    socket.create_connection(("127.0.0.1", 22), timeout=3).close()
    report["socket"] = "ok"
except OSError as err:
    report["socket"] = type(err).__name__
try:
    socket.getaddrinfo("pypi.org", 443)
    report["dns"] = "ok"
except OSError as err:
    report["dns"] = type(err).__name__
report["rlimit_data"] = resource.getrlimit(resource.RLIMIT_DATA)[0]
report["tmp_empty"] = os.listdir(os.environ["TMPDIR"]) == []
open(os.path.join(out, "probe.json"), "w").write(json.dumps(report))
"""


@pytest.mark.skipif(not shutil.which("unshare") or sys.platform != "linux", reason="needs util-linux unshare")
def test_sandbox_blocks_input_writes_network_and_root(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    probe.chmod(0o644)
    tmp_path.chmod(0o755)
    job, out = JOBS / "Task101_Example_sl_bin_clf-fold0", tmp_path / "out"
    cmd = [str(REPO / "scripts" / "sandbox_run.sh"), "--input", str(job), "--output", str(out), "--memory", "4g"]
    cmd += ["--", sys.executable, str(probe), "{input}", "{output}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode == 125:
        pytest.skip(f"sandbox cannot be set up here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = orjson.loads((out / "probe.json").read_bytes())
    assert report["write_input"] != "ok"
    assert report["socket"] != "ok" and report["dns"] != "ok"
    assert report["uid"] != 0 or os.getuid() != 0
    assert report["rlimit_data"] == 4 * 2**30
    assert report["tmp_empty"]
    assert not (job / "written-by-job.txt").exists()
