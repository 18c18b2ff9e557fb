"""The server's start-up caches (remote/server/startup.py), each in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, *, env: dict[str, str] | None = None, path: list[Path] = ()) -> str:
    """Run code in a new interpreter with the repository (and `path`) importable; its stdout."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, path)])
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    """A package on its own sys.path entry, as an image's site-packages would hold it."""
    site = tmp_path / "site"
    (site / "orchdemo").mkdir(parents=True)
    (site / "orchdemo" / "__init__.py").write_text("VALUE = 42\n")
    return site


def test_bytecode_is_kept_in_orchs_home_when_the_image_forbids_writing_it(tmp_path: Path, package: Path):
    home = tmp_path / "home"
    code = f"""
        from pathlib import Path
        from remote.server.startup import keep_bytecode
        keep_bytecode(Path({str(home / 'pycache')!r}), packages=("orchdemo",))
        import orchdemo
        print(orchdemo.__cached__)
    """
    cached = Path(python(code, env={"PYTHONDONTWRITEBYTECODE": "1"}, path=[package]).strip())
    assert cached.is_file() and home / "pycache" in cached.parents, cached
    assert not (package / "orchdemo" / "__pycache__").exists(), "nothing written into the image's folders"
    written = cached.stat().st_mtime_ns
    python(code, env={"PYTHONDONTWRITEBYTECODE": "1"}, path=[package])
    assert cached.stat().st_mtime_ns == written, "the second start used the cached bytecode, compiling nothing"

    # Bytecode beside the sources (pip writes it at install) is used as it is, even where
    # writing is forbidden: a prefix would make Python ignore it and compile everything again.
    shipped = tmp_path / "shipped"
    shutil.copytree(package, shipped)
    py_compile.compile(str(shipped / "orchdemo" / "__init__.py"), cfile=importlib.util.cache_from_source(
        str(shipped / "orchdemo" / "__init__.py")))
    used = Path(python(code, env={"PYTHONDONTWRITEBYTECODE": "1"}, path=[shipped]).strip())
    assert used.parent == shipped / "orchdemo" / "__pycache__"

    # An image that lets Python write bytecode where it always does is left alone.
    plain = Path(python(code, path=[package]).strip())
    assert plain.parent == package / "orchdemo" / "__pycache__"


def test_package_map_is_remembered_until_a_distribution_is_installed(tmp_path: Path, package: Path):
    saved = tmp_path / "package-map.json"
    code = f"""
        import importlib.metadata, json
        from pathlib import Path
        from remote.server.startup import remember_package_map
        remember_package_map(Path({str(saved)!r}))
        print(json.dumps(importlib.metadata.packages_distributions()))
    """
    first = json.loads(python(code, path=[package]))
    expected = json.loads(python("import importlib.metadata, json; print(json.dumps(importlib.metadata.packages_distributions()))",
                                 path=[package]))
    assert first == expected, "the remembered map is the one importlib computes"
    assert json.loads(saved.read_text())["map"] == expected

    # The next start reads the file (a planted entry shows it was not computed again)...
    planted = json.loads(saved.read_text())
    planted["map"]["planted_module"] = ["planted-dist"]
    saved.write_text(json.dumps(planted))
    assert json.loads(python(code, path=[package]))["planted_module"] == ["planted-dist"]

    # ...until something is installed on sys.path: a new .dist-info folder.
    dist = package / "newdist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: newdist\nVersion: 1.0\n")
    (dist / "top_level.txt").write_text("newmod\n")
    after = json.loads(python(code, path=[package]))
    assert "planted_module" not in after and after["newmod"] == ["newdist"]

    # A damaged file is computed again, not an error.
    saved.write_text("{not json")
    assert json.loads(python(code, path=[package]))["newmod"] == ["newdist"]


def test_packages_only_other_libraries_features_use_are_hidden(tmp_path: Path):
    site = tmp_path / "site"
    (site / "sklearn").mkdir(parents=True)
    (site / "sklearn" / "__init__.py").write_text("")
    code = """
        import importlib.util, sys
        if sys.argv[-1] != "plain":
            from remote.server.startup import hide_unused_packages
            hide_unused_packages()
        print(importlib.util.find_spec("sklearn") is None)
    """
    assert python(code, path=[site]).strip() == "True"
    assert python(code.replace('sys.argv[-1] != "plain"', "False"), path=[site]).strip() == "False"
