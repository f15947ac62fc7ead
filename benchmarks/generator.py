"""Forward latency and peak memory of the config-f StyleGAN2 generator (z -> image), on CPU and CUDA.

    .venv/bin/python benchmarks/generator.py            # 1024² and 256², batch 1 and 8, CPU (+ CUDA if present)
    .venv/bin/python benchmarks/generator.py --quick    # fewer runs
    .venv/bin/python benchmarks/generator.py --resolutions 256 --batches 1 --devices cpu --json-out out.json

Each (device, resolution, batch) runs in a fresh subprocess so CPU peak memory is that case alone: the
growth of ``ru_maxrss`` from just before the generator is built to the end of the timed runs (weights +
activations). On CUDA the peak is ``torch.cuda.max_memory_allocated``. Latency is the median of the
timed runs after warm-up, under ``torch.inference_mode`` with the stored (const) noise. Weights are
random: speed and memory do not depend on their values. Prints JSON, then a plain table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from fluidsrv.models.stylegan2 import Generator, GeneratorConfig


def measure_case(
    device: str, resolution: int, batch: int, warmup: int, runs: int, threads: int | None
) -> dict[str, Any]:
    """Build one generator and time its forward pass; meant to run alone in its process."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    generator = Generator(GeneratorConfig(resolution=resolution)).to(device).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in (*generator.parameters(), *generator.buffers()))
    z = torch.randn(batch, generator.w_dim, device=device)  # [N, w_dim]
    on_cuda = device.startswith("cuda")

    def forward() -> float:
        start = time.perf_counter()
        image = generator(z)  # [N, 3, R, R]
        if on_cuda:
            torch.cuda.synchronize()
        assert image.shape == (batch, 3, resolution, resolution)
        return time.perf_counter() - start

    with torch.inference_mode():
        for _ in range(warmup):
            forward()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = [forward() for _ in range(runs)]

    if on_cuda:
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) * 1024
    median = statistics.median(seconds)
    return {
        "device": device,
        "resolution": resolution,
        "batch": batch,
        "median_ms": round(median * 1e3, 1),
        "min_ms": round(min(seconds) * 1e3, 1),
        "ms_per_image": round(median * 1e3 / batch, 1),
        "runs": runs,
        "warmup": warmup,
        "peak_mib": round(peak_bytes / 2**20, 1),
        "weights_mib": round(weight_bytes / 2**20, 1),
        "threads": torch.get_num_threads(),
    }


def run_in_subprocess(device: str, resolution: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one case in a fresh interpreter and return its result dict."""
    command = [
        sys.executable, __file__, "--worker",
        "--devices", device, "--resolutions", str(resolution), "--batches", str(batch),
        "--warmup", str(args.warmup), "--runs", str(args.runs),
    ]  # fmt: skip
    if args.threads:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        return {"device": device, "resolution": resolution, "batch": batch, "error": completed.stderr.strip()[-500:]}
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    """Render the results as an aligned plain-text table."""
    columns = {
        "device": "device",
        "resolution": "res",
        "batch": "batch",
        "median_ms": "median ms",
        "min_ms": "min ms",
        "ms_per_image": "ms/image",
        "peak_mib": "peak MiB",
        "weights_mib": "weights MiB",
        "threads": "threads",
    }
    header, keys = list(columns.values()), list(columns)
    rows = [header]
    for result in results:
        if "error" in result:
            rows.append([str(result["device"]), str(result["resolution"]), str(result["batch"]), "error: see JSON"])
        else:
            rows.append([str(result[key]) for key in keys])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in rows)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed runs per case")
    parser.add_argument("--devices", default=None, help="comma list (default: cpu, plus cuda when available)")
    parser.add_argument("--resolutions", default="1024,256", help="comma list of generator resolutions")
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per case (default 2, quick 1)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.runs = args.runs if args.runs is not None else (3 if args.quick else 7)
    if args.devices is None:
        args.devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    return args


def main() -> None:
    """Run every case (each in its own subprocess) and print JSON and a table."""
    args = parse_args()
    devices = args.devices.split(",")
    resolutions = [int(r) for r in args.resolutions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(measure_case(devices[0], resolutions[0], batches[0], args.warmup, args.runs, args.threads)))
        return

    results = []
    for device in devices:
        for resolution in resolutions:
            for batch in batches:
                results.append(run_in_subprocess(device, resolution, batch, args))
                print(f"# done {device} {resolution} batch {batch}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "stylegan2 generator forward (mapping + synthesis), config-f",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            handle.write(text + "\n")
    print(text)
    print()
    print(format_table(results))


if __name__ == "__main__":
    main()
