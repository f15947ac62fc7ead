"""benchmarks/gpu.py --smoke: every section of the GPU benchmark runs on a CPU at tiny sizes and prints its lines."""

from __future__ import annotations

import pytest

from benchmarks import gpu

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_gpu_benchmark_smoke_run_prints_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if ": failed" in line or "skipped" in line or "not available" in line]
    assert not failed, failed
    for start in ("device: cpu", "synthesis 16 batch 1 fp32:", "synthesis 32 batch 2 fp32:", "memory 32 lowrank: delta",
                  "sessions per 80 GB 32 full:", "preview 4 sessions", "pti 32 lowrank:", "pti 32 full:",
                  "student 32: preview", "total:"):
        assert any(line.startswith(start) for line in lines), (start, lines)
    preview = next(line for line in lines if line.startswith("preview 4 sessions"))
    assert "p95" in preview and " 0 errors" in preview
