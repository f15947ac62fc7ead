"""Slider → preview-frame latency and frame rate of the real server, for 1, 8 and 32 concurrent clients.

Starts ``python -m fluidsrv serve`` in a subprocess (real uvicorn on loopback), prepares a few sessions
from a photo, then has every client drag a slider (messages at ``--rate`` per second) over its own
websocket. Latency is measured per received frame: arrival time minus the send time of the slider
state it shows (frames of superseded states are never sent, so coalescing is part of the figure).

    .venv/bin/python benchmarks/preview_latency.py --generator embedded --clients 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PHOTO = REPO.parent / "shared" / "photos" / "deepface_img12.jpg"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def start_server(args: argparse.Namespace, data_dir: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FLUIDSRV_GENERATOR": args.generator,
        "FLUIDSRV_DEVICE": args.device,
        "FLUIDSRV_DATA_DIR": data_dir,
        "FLUIDSRV_MAX_SESSIONS": "256",
        "FLUIDSRV_FINETUNE": args.finetune,
        "FLUIDSRV_FINETUNE_STEPS": str(args.finetune_steps),
        "FLUIDSRV_PLUGIN_OPTIONS": json.dumps({"encoder.project": {"steps": args.project_steps}}),
    }
    command = [sys.executable, "-m", "fluidsrv", "serve", "--port", str(args.port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_healthy(base: str, server: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as http:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                log = server.stderr.read() if server.stderr else b""
                raise RuntimeError("server exited: " + log.decode(errors="replace")[-2000:])
            try:
                if (await http.get("/api/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def prepare_session(http: httpx.AsyncClient, host: str, photo: bytes) -> dict[str, Any]:
    created = (await http.post("/api/sessions", files={"file": ("photo.jpg", photo, "image/jpeg")})).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    await http.post(f"/api/sessions/{created['session_id']}/face", json={"index": 0}, headers=headers)
    url = f"ws://{host}/api/sessions/{created['session_id']}/ws?token={created['token']}"
    async with websockets.connect(url) as ws:
        status = json.loads(await ws.recv())["status"]
        while status != "ready":
            message = await ws.recv()
            if isinstance(message, str):
                data = json.loads(message)
                if data["type"] == "error":
                    raise RuntimeError(data)
                status = "ready" if data["type"] == "ready" else status
    return created


async def drag(host: str, session: dict[str, Any], slider: str, messages: int, rate: float) -> tuple[list[float], int]:
    """Send ``messages`` slider states at ``rate``/s; return frame latencies (s) and the frame count."""
    url = f"ws://{host}/api/sessions/{session['session_id']}/ws?token={session['token']}"
    sent: dict[int, float] = {}
    latencies: list[float] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()  # state

        async def receive() -> None:
            while True:
                message = await ws.recv()
                if isinstance(message, bytes) and message[2] == 1:
                    seq = int.from_bytes(message[4:8], "big")
                    latencies.append(time.perf_counter() - sent[seq])
                    if seq == messages - 1:
                        return

        receiver = asyncio.create_task(receive())
        for seq in range(messages):
            value = 3.0 * ((seq % 40) / 20.0 - 1.0)
            sent[seq] = time.perf_counter()
            await ws.send(json.dumps({"seq": seq, "values": {slider: value}}))
            await asyncio.sleep(1.0 / rate)
        await asyncio.wait_for(receiver, timeout=600)
    return latencies, len(latencies)


async def measure(args: argparse.Namespace, host: str) -> dict[str, Any]:
    photo = Path(args.photo).read_bytes()
    async with httpx.AsyncClient(base_url=f"http://{host}", timeout=600) as http:
        config = (await http.get("/api/config")).json()
        slider = (await http.get("/api/directions")).json()["directions"][0]["name"]
        sessions = [await prepare_session(http, host, photo) for _ in range(args.sessions)]
        rows = []
        for clients in args.clients:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(drag(host, sessions[i % len(sessions)], slider, args.messages, args.rate) for i in range(clients))
            )
            elapsed = time.perf_counter() - started
            latencies = [value for result in results for value in result[0]]
            frames = sum(result[1] for result in results)
            rows.append({
                "clients": clients,
                "messages_per_client": args.messages,
                "frames": frames,
                "frames_per_second": round(frames / elapsed, 2),
                "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
                "latency_p95_ms": round(1000 * percentile(latencies, 0.95), 1),
            })
        stats = (await http.get("/api/stats")).json()["executor"]
    return {"generator": config["generator"], "previewer": config["active"]["previewer"],
            "device": config["generator"]["device"], "rate_per_client": args.rate, "rows": rows,
            "previews_rendered": stats["previews_rendered"], "previews_coalesced": stats["previews_coalesced"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", default="1,8,32", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--sessions", type=int, default=4, help="sessions the clients are spread over")
    parser.add_argument("--messages", type=int, default=100, help="slider messages per client")
    parser.add_argument("--rate", type=float, default=30.0, help="slider messages per second per client")
    parser.add_argument("--photo", default=str(DEFAULT_PHOTO))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--finetune", default="lowrank")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--project-steps", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    host = f"127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as data_dir:
        server = start_server(args, data_dir)
        try:
            asyncio.run(wait_healthy(f"http://{host}", server))
            report = asyncio.run(measure(args, host))
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\npreview path: {report['previewer']} on {report['device']}, generator {report['generator']['source']}")
    print(f"{'clients':>8} {'frames':>8} {'frames/s':>9} {'p50 ms':>8} {'p95 ms':>8}")
    for row in report["rows"]:
        print(f"{row['clients']:>8} {row['frames']:>8} {row['frames_per_second']:>9} "
              f"{row['latency_p50_ms']:>8} {row['latency_p95_ms']:>8}")


if __name__ == "__main__":
    main()
