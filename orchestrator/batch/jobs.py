"""The jobs file: one A1111 txt2img request (a JSON object) a line, every line checked before
anything is created; each request keyed by a hash of its canonical JSON.

The key names a request's results (`<key>.png`, `<key>.json`): identical requests share one
key (run once), and a re-run skips every key whose results are already there.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

KEY_HEX = 16  # 64 bits of SHA-256: no collision among any number of requests a person runs
# Fields that must be whole numbers of at least 1 when given (A1111's names).
POSITIVE_INTS = ("batch_size", "n_iter", "steps", "width", "height")
# Fields that belong to img2img: a txt2img server ignores them and makes something else.
IMG2IMG_ONLY = ("init_images", "mask")
EXAMPLE = '{"prompt": "a cat on a castle", "steps": 20, "seed": 1}'


@dataclass(frozen=True)
class Job:
    key: str
    request: dict[str, Any]
    line: int  # the first line that asked for it (1-based)

    @property
    def images(self) -> int:
        return int(self.request.get("batch_size", 1)) * int(self.request.get("n_iter", 1))


@dataclass
class JobsFile:
    path: Path
    jobs: list[Job]
    digest: str  # SHA-256 of the file's bytes
    duplicates: int = 0  # lines asking for a request an earlier line asked for
    random_duplicates: list[int] = field(default_factory=list)  # such lines with no fixed seed


def canonical(request: dict[str, Any]) -> str:
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(request).encode()).hexdigest()[:KEY_HEX]


def _kind(value: Any) -> str:
    return {list: "a JSON array", str: "a JSON string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_request(obj: Any) -> str | None:
    """What is wrong with one parsed line, in words (None: nothing)."""
    if not isinstance(obj, dict):
        return f"{_kind(obj)}, not a JSON object; write one object a line, like {EXAMPLE}"
    prompt = obj.get("prompt")
    if "prompt" not in obj:
        return f'no "prompt"; every line needs one, like {EXAMPLE}'
    if not isinstance(prompt, str):
        return f'"prompt" is {_kind(prompt)}; write it as a JSON string'
    if not prompt.strip():
        return '"prompt" is empty; write what to draw'
    for name in POSITIVE_INTS:
        if name in obj:
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f'"{name}" is {json.dumps(value)}; write a whole number of at least 1'
    if "seed" in obj and (isinstance(obj["seed"], bool) or not isinstance(obj["seed"], int)):
        return f'"seed" is {json.dumps(obj["seed"])}; write a whole number (-1: a random seed)'
    if "cfg_scale" in obj:
        value = obj["cfg_scale"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f'"cfg_scale" is {json.dumps(value)}; write a number like 7'
    for name in IMG2IMG_ONLY:
        if name in obj:
            return f'"{name}" is an img2img field; orch batch runs txt2img requests: leave it out'
    return None


def _reject(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON; write a finite number")


def parse_lines(text: str, where: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, request) of every non-blank line, and what is wrong with the others."""
    good: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, parse_constant=_reject)
        except ValueError as e:
            problems.append(f"{where}:{number}: not JSON ({e}); write one JSON object a line, like {EXAMPLE}")
            continue
        problem = check_request(obj)
        if problem:
            problems.append(f"{where}:{number}: {problem}")
        else:
            good.append((number, obj))
    return good, problems


def load(path: Path) -> JobsFile:
    """Every line of the file checked; a ConfigError names the first bad line and what to fix."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; give a JSONL file of txt2img requests, one object a line") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    lines, problems = parse_lines(text, str(path))
    if problems:
        more = f" (and {len(problems) - 1} more bad line(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more + "; nothing was started")
    if not lines:
        raise ConfigError(f"{path} has no requests; write one txt2img request a line, like {EXAMPLE}")
    jobs: dict[str, Job] = {}
    duplicates, random_duplicates = 0, []
    for number, request in lines:
        key = request_key(request)
        if key in jobs:
            duplicates += 1
            if request.get("seed", -1) == -1:
                random_duplicates.append(number)
            continue
        jobs[key] = Job(key, request, number)
    return JobsFile(path, list(jobs.values()), hashlib.sha256(data).hexdigest(), duplicates, random_duplicates)
