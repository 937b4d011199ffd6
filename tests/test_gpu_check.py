"""benchmarks/gpu_check.sh's CPU dry run: every section of the GPU check on the CPU at tiny sizes, with Ray refused
at import (the GPU machine has none). What the GPU run itself measures cannot be checked here; that its code runs,
imports no Ray and gets exact INT4 weights out of torch's CPU kernel, can."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(2000)
@pytest.mark.slow  # ~30 s of CPU (model builds, two learners, HF generate); much longer on a busy machine
def test_gpu_check_cpu_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out", str(out)],
        cwd=ROOT,
        # the script's own 480 s cap is for the GPU machine; a busy CI machine gets more
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT_S": "1800"},
        capture_output=True,
        text=True,
        timeout=1900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["ray_imported"] is False
    layout = report["int4_layout"]["shapes"]
    assert [r["shape"] for r in layout] == [[64, 128], [32, 256]]
    # the kernel ran (no dense fallback) and multiplies by exactly the bf16 fake-quant weight
    assert all(r["kernel"] and r["weight_exact"] for r in layout)
    assert all(r["max_rel_err"] < 2e-2 for r in layout)  # bf16 activations and output
    assert report["int4_matvec"]["kernel"] and report["int4_matvec"]["int4"]["us"] > 0
    decode = report["decode"]
    for key in ("bf16_batch1", "int4_batch1", "bf16_batch2", "int4_batch2"):
        assert decode[key]["tokens_per_s"] > 0 and decode[key]["mb_per_step"] > 0
    assert decode["int4_batch1"]["mb_per_step"] < decode["bf16_batch1"]["mb_per_step"]
    assert report["engine_vs_hf"]["batch2"]["identical_sequences"].endswith("/2")
    fp32, bf16 = report["learner_fp32"], report["learner_bf16"]
    assert fp32["fake_quant"] == 1.0 and bf16["fake_quant"] == 1.0 and fp32["on"] == "cpu"
    assert len(fp32["update_s"]) == 2 and fp32["tokens"] == 4 * 16
    # fp32 INT4 rollouts on the CPU are exact products of the fake-quant weights: the mismatch is float noise;
    # bf16 activations and weights leave a visible one
    assert fp32["mismatch_abs_logp"] < 1e-6 and math.isfinite(fp32["grad_norm"])
    assert 100 * fp32["mismatch_abs_logp"] < bf16["mismatch_abs_logp"] < 0.1
    assert fp32["mismatch_quant_abs_logp"] > 0  # the same tokens without fake-quant: what quantization moves
