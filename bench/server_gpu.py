"""Plain diffusers vs orch's server over HTTP, on one GPU, in one run.

Run on a GPU machine: python bench/server_gpu.py [--arch sd15|sdxl] [--out DIR]
CPU smoke (what CI runs): python bench/server_gpu.py --smoke
One ControlNet unit against plain diffusers' ControlNet pipeline: --controlnet (bench/server_gpu_controlnet.py)

Measures, with a full-size random-weight architecture (speed does not depend on weights),
at the arch's native size, 30 steps, CFG on, fp16:
  - plain diffusers (StableDiffusionPipeline / XL in fp16, nothing else): seconds per image, batch 1
  - orch's server over HTTP, end to end (request -> PNG in the JSON): seconds per image, batch 1
  - images/s with 8 concurrent clients
  - seconds from server start to the first image with a cold compile cache, then a warm one
Goals (SD1.5, H100): <= 0.30 s/image (>= 4x plain); >= 6 images/s at 8 clients; <= 20 s warm start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# Before diffusers (the plain-diffusers peer imports it first): lets PyPI's CUDA-built torchvision, where it sits
# beside a CPU-only torch, import without its C ops (remote/server/torchvision_compat.py); nothing elsewhere.
import remote.server  # noqa: F401,E402

TOKEN = "bench-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    def __init__(self, home: Path, env: dict[str, str], extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "remote.server", "--home", str(home), "--port", str(self.port),
                                      *extra_args],
                                     env=env, stdout=open(home / f"server-{self.port}.log", "wb"), stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[1])
        self.home = home
        # One keep-alive client with TCP_NODELAY, as A1111 clients (requests.Session, whose
        # urllib3 sets TCP_NODELAY) hold one: without it Nagle + delayed ACK add ~40 ms.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.client = httpx.Client(timeout=1200, transport=transport,
                                   limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("server died:\n" + (self.home / f"server-{self.port}.log").read_text()[-4000:])
            try:
                h = httpx.get(f"{self.base}/healthz", timeout=2).json()
                if h["status"] == "ready":
                    return h
                if h["status"] == "error":
                    raise SystemExit(f"server error: {h}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not ready in time:\n" + (self.home / f"server-{self.port}.log").read_text()[-4000:])

    def wait_compiled(self, timeout: float) -> dict:
        """Until the compiled model serves (the server answers uncompiled before that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = httpx.get(f"{self.base}/healthz", timeout=5).json()
            if h.get("compiled") in (None, "done", "failed"):
                return h
            time.sleep(0.2)
        raise SystemExit("not compiled in time")

    def txt2img(self, body: dict) -> dict:
        r = self.client.post(f"{self.base}/sdapi/v1/txt2img", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        if r.status_code != 200:
            log_tail = (self.home / f"server-{self.port}.log").read_text(errors="replace")[-6000:]
            raise SystemExit(f"txt2img answered {r.status_code}: {r.text[:2000]}\n--- server log ---\n{log_tail}")
        return r.json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class ClientsRun:
    """Concurrent clients, each sending its requests one after another, and what the answers said."""

    images_per_s: float
    errors: list[str]
    served: dict[str, int]  # the replica that answered (x-orch-replica) -> requests; "-" without replicas
    batch_sizes: dict[int, int]  # images in the batch a request ran in -> requests
    gpu_idle_median_s: float | None  # the GPU's wait before each batch: the clients' turnaround and the gather
    phases_median: dict[str, float]
    # While every client is still sending (from the last client's first answer to the first
    # client's last one): the concurrency asked for, without the ramp and the tail.
    steady_images_per_s: float | None = None
    # Medians of a request's way in (client sent -> the server's handler began), its way out
    # (the handler returned -> the client had the whole answer), and the client's own turn
    # (an answer read -> its next request sent). Same host, so wall clocks compare.
    way_in_median_s: float | None = None
    way_out_median_s: float | None = None
    client_turn_median_s: float | None = None


def _steady_rate(done: dict[int, list[float]]) -> float | None:
    starts = [times[0] for times in done.values() if times]
    ends = [times[-1] for times in done.values() if times]
    if len(starts) < len(done) or not starts:
        return None
    t_a, t_b = max(starts), min(ends)
    inside = sorted(t for times in done.values() for t in times if t_a <= t <= t_b)
    if len(inside) < 3 or inside[-1] - inside[0] <= 0:
        return None
    # The slope of answers against time: answers come a batch at a time, so counting them between
    # two instants is off by up to a batch at either end; a fitted line is not.
    return statistics.linear_regression(inside, range(len(inside))).slope


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_clients(server: "Server", body: dict, clients: int, rounds: int) -> ClientsRun:
    errors: list[str] = []
    served: dict[str, int] = {}
    batch_sizes: list[int] = []
    idle: list[float] = []
    phases: list[dict] = []
    lock = threading.Lock()
    done: dict[int, list[float]] = {c: [] for c in range(clients)}
    way_in: list[float] = []
    way_out: list[float] = []
    turn: list[float] = []

    def client(c: int) -> None:
        last_answer = None
        for k in range(rounds):
            try:
                sent = time.time()
                if last_answer is not None:
                    turn.append(sent - last_answer)
                r = server.client.post(f"{server.base}/sdapi/v1/txt2img", headers={"Authorization": f"Bearer {TOKEN}"},
                                       json={**body, "prompt": f"{body['prompt']}, client {c} take {k}",
                                             "seed": 1000 + 100 * c + k})
                answered = last_answer = time.time()
                r.raise_for_status()
                info = json.loads(r.json()["info"])
                with lock:
                    done[c].append(answered)
                    if "orch_received_at" in info:
                        way_in.append(info["orch_received_at"] - sent)
                        way_out.append(answered - info["orch_answered_at"])
                    replica = r.headers.get("x-orch-replica", "-")
                    served[replica] = served.get(replica, 0) + 1
                    batch_sizes.append(info["orch_batch_images"])
                    idle.append(info.get("orch_gpu_idle_before_seconds") or 0.0)
                    phases.append(info.get("orch_phase_seconds") or {})
            except Exception as e:  # counted, not hidden
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    timed = [p for p in phases if p]
    return ClientsRun(images_per_s=(clients * rounds - len(errors)) / elapsed, errors=errors, served=served,
                      batch_sizes={b: batch_sizes.count(b) for b in sorted(set(batch_sizes))},
                      gpu_idle_median_s=statistics.median(idle) if idle else None,
                      phases_median={k: statistics.median(p[k] for p in timed) for k in timed[0]} if timed else {},
                      steady_images_per_s=_steady_rate(done), way_in_median_s=_median(way_in),
                      way_out_median_s=_median(way_out), client_turn_median_s=_median(turn))


def start(server: Server, label: str, body: dict, results: dict) -> None:
    """Server start -> first image; the compiled model serves from "ready" on."""
    health = server.wait_ready(1800)
    server.txt2img(body)
    results[f"{label}_start_to_first_image_s"] = time.monotonic() - server.started
    health = server.wait_compiled(1800)
    results[f"{label}_start_to_compiled_s"] = time.monotonic() - server.started
    t = time.perf_counter()
    server.txt2img(body)
    results[f"{label}_first_compiled_image_s"] = time.perf_counter() - t
    results[f"{label}_health"] = health
    log(f"{label} start: first image {results[f'{label}_start_to_first_image_s']:.1f}s, compiled model serving at "
        f"{results[f'{label}_start_to_compiled_s']:.1f}s (imports {health.get('import_seconds')}s, "
        f"load {health.get('load_seconds')}s, compile or warm-up {health.get('warmup_seconds')}s; "
        f"precompiled graphs {health.get('precompiled')}); phases ended at (s since process start): "
        f"{health.get('startup_seconds')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--smoke", action="store_true", help="tiny demo model on the CPU, few steps (CI)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--skip-warm", action="store_true")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients; 0 skips that part")
    parser.add_argument("--rounds", type=int, default=10, help="requests each concurrent client sends, one after another")
    parser.add_argument("--home", help="keep the server's home (models, compile caches) here instead of a temporary folder")
    parser.add_argument("--warm-batches", default="1,8", help="batch sizes the server compiles at boot")
    parser.add_argument("--controlnet", action="store_true", help="SD1.5 with one ControlNet unit vs plain diffusers' ControlNet pipeline")
    args = parser.parse_args()
    if args.controlnet:
        import server_gpu_controlnet

        server_gpu_controlnet.run(args, Server, log, TOKEN)
        return

    import torch

    smoke = args.smoke
    cuda = torch.cuda.is_available() and not smoke
    steps = 3 if smoke else 30
    side = 64 if smoke else (512 if args.arch == "sd15" else 1024)
    n_requests = 3 if smoke else args.requests
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="orch-bench-server-"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(TOKEN)
    models = home / "models"
    results: dict = {"arch": "demo" if smoke else args.arch, "size": side, "steps": steps,
                     "device": torch.cuda.get_device_name() if cuda else "cpu"}

    # 1. The model, written once, as a user's diffusers folder would be.
    t0 = time.monotonic()
    if smoke:
        from remote.server.demo_model import ensure_demo_model

        model_dir = ensure_demo_model(models)
    else:
        from remote.server.architectures import build_random_pipeline

        model_dir = models / f"{args.arch}-random"
        build_random_pipeline(args.arch, dtype=torch.float16, device="cuda").save_pretrained(model_dir)
        torch.cuda.empty_cache()
    log(f"model written in {time.monotonic() - t0:.1f}s")

    # 2. Plain diffusers, the peer: fp16, defaults, nothing else.
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if cuda else torch.float32
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype).to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)

    def plain_once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(prompt="a cat on a castle", num_inference_steps=steps, guidance_scale=7.0, width=side, height=side)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2):
        plain_once()
    plain = [plain_once() for _ in range(n_requests)]
    results["plain_s_per_image"] = statistics.median(plain)
    log(f"plain diffusers: {results['plain_s_per_image']:.3f}s/image")
    pipe = None  # free its memory before the server loads the same model
    if cuda:
        torch.cuda.empty_cache()

    # 3. orch's server over HTTP, cold compile cache.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env.update(ORCH_COMPILE="0", ORCH_WARMUP="0")
    else:
        env["ORCH_WARMUP"] = f"{side}x{side}:{args.warm_batches}"
        env["TORCH_LOGS"] = "recompiles"  # a recompile after warm-up would show in the server log
    body = {"prompt": "a cat on a castle", "steps": steps, "width": side, "height": side, "cfg_scale": 7.0,
            "sampler_name": "Euler", "seed": 1}
    server = Server(home, env)
    start(server, "cold", body, results)

    seq, inside, queued, encoded, handled, phases1 = [], [], [], [], [], []
    for i in range(n_requests):
        t = time.perf_counter()
        # A new prompt each time: the server keeps recent (prompt, negative prompt) encodings,
        # and this measures the path without that cache, as when a user writes new prompts.
        r = server.txt2img({**body, "prompt": f"{body['prompt']}, take {i}", "seed": 100 + i})
        seq.append(time.perf_counter() - t)
        info = json.loads(r["info"])
        inside.append(info["orch_seconds"])
        queued.append(info["orch_queue_seconds"])
        encoded.append(info["orch_encode_seconds"])
        handled.append(info["orch_request_seconds"])
        phases1.append(info.get("orch_phase_seconds") or {})
    results["server_s_per_image"] = statistics.median(seq)
    results["server_pipeline_s_per_image"] = statistics.median(inside)  # without HTTP and PNG
    results["server_queue_s"] = statistics.median(queued)
    results["server_png_s"] = statistics.median(encoded)
    results["server_handler_s"] = statistics.median(handled)  # the rest of end to end: HTTP + JSON both ways
    results["phases_batch1_median"] = {k: statistics.median(p[k] for p in phases1 if k in p)
                                       for k in (phases1[0] if phases1 else {})}
    results["speedup_vs_plain"] = results["plain_s_per_image"] / results["server_s_per_image"]
    log(f"server: {results['server_s_per_image']:.3f}s/image end to end ({results['speedup_vs_plain']:.2f}x plain), "
        f"{results['server_pipeline_s_per_image']:.3f}s in the pipeline; phases (median) {results['phases_batch1_median']}")
    # Let the background warm-up of the other batch sizes finish before measuring concurrency.
    deadline = time.monotonic() + 900
    while httpx.get(f"{server.base}/healthz").json().get("background_warmup") == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    results["cold_background_warmup_s"] = httpx.get(f"{server.base}/healthz").json().get("background_warmup_seconds")

    if args.clients:
        t = time.perf_counter()
        r = server.txt2img({**body, "batch_size": 8, "seed": 500})
        results["server_batch8_s"] = time.perf_counter() - t
        results["server_batch8_pipeline_s"] = json.loads(r["info"])["orch_seconds"]
        log(f"one request of batch 8: {results['server_batch8_s']:.3f}s ({results['server_batch8_pipeline_s']:.3f}s in the pipeline)")

        clients, per_client = args.clients, (2 if smoke else args.rounds)
        run = run_clients(server, body, clients, per_client)
        results["images_per_s_8_clients"] = run.images_per_s
        results["errors"] = len(run.errors)
        results["batch_size_seen_by_requests"] = run.batch_sizes
        results["gpu_idle_before_batch_s"] = run.gpu_idle_median_s
        results["phases_batch8_median"] = run.phases_median
        log(f"{clients} clients: {results['images_per_s_8_clients']:.2f} images/s ({len(run.errors)} errors); "
            f"batch sizes requests ran in: {results['batch_size_seen_by_requests']}; GPU idle before a batch "
            f"(median) {results['gpu_idle_before_batch_s']}s; pipeline phases (median) {results['phases_batch8_median']}")
    server.stop()

    # 4. Warm compile cache: the same instance disk, the server started again (it loads the
    #    compiled graphs saved by the first start, remote/server/precompiled.py).
    if not args.skip_warm:
        server = Server(home, env)
        start(server, "warm", body, results)
        server.stop()

    print()
    print(f"{results['device']}, {results['arch']} {side}x{side}, {steps} steps, CFG 7, batch 1")
    print(f"{'plain diffusers s/image':<40}{results['plain_s_per_image']:>10.3f}")
    print(f"{'orch server s/image (HTTP, end to end)':<40}{results['server_s_per_image']:>10.3f}")
    print(f"{'  of which in the pipeline':<40}{results['server_pipeline_s_per_image']:>10.3f}")
    print(f"{'  of which queued / PNG encoding':<40}{results['server_queue_s']:>5.3f} / {results['server_png_s']:.3f}")
    print(f"{'  of which HTTP + JSON (outside handler)':<40}{results['server_s_per_image'] - results['server_handler_s']:>10.3f}")
    print(f"{'ratio (plain / orch)':<40}{results['speedup_vs_plain']:>10.2f}x")
    if "images_per_s_8_clients" in results:
        print(f"{'orch images/s, 8 concurrent clients':<40}{results['images_per_s_8_clients']:>10.2f}")
        print(f"{'orch images/s, one request of batch 8':<40}{8 / results['server_batch8_s']:>10.2f}")
    print(f"{'plain images/s, one at a time':<40}{1 / results['plain_s_per_image']:>10.2f}")
    print(f"{'cold start -> first image (s)':<40}{results['cold_start_to_first_image_s']:>10.1f}")
    if "cold_start_to_compiled_s" in results:
        print(f"{'cold start -> compiled model serving (s)':<40}{results['cold_start_to_compiled_s']:>10.1f}")
    if "warm_start_to_first_image_s" in results:
        print(f"{'warm start -> first image (s)':<40}{results['warm_start_to_first_image_s']:>10.1f}")
        print(f"{'warm start -> compiled model serving (s)':<40}{results.get('warm_start_to_compiled_s', 0):>10.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        logs = "\n".join(p.read_text(errors="replace")[-6000:] for p in sorted(home.glob("server-*.log")))
        (Path(args.out) / f"server_log_{results['arch']}.txt").write_text(logs)
        (Path(args.out) / f"server_gpu_{results['arch']}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
