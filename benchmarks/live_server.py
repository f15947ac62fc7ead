"""Run ``fluidsrv serve`` in a subprocess for the benchmarks that talk to a live server over loopback.

``serve(..., checkout=PATH)`` runs the server of another checkout of the repository (e.g. a git worktree of an
older commit) instead of this one: the venv's editable install maps ``fluidsrv`` and ``fluidsrv_plugins`` to this
tree, so the server is started through :data:`CHECKOUT_BOOTSTRAP`, which drops that finder and imports both
packages from ``PATH`` (``PATH/fluidsrv`` and ``PATH/plugins``); the paths it imported are logged by the server
process and checked before ``serve`` yields.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fluidsrv.settings import REPO_ROOT

SERVER_START_SECONDS = 300.0
BOOTSTRAP_MARK = "live_server bootstrap: "

# python -c CHECKOUT_BOOTSTRAP ROOT ARGS...: run ``fluidsrv ARGS...`` with fluidsrv and fluidsrv_plugins from ROOT.
CHECKOUT_BOOTSTRAP = f"""
import importlib.abc, importlib.util, json, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
packages = {{"fluidsrv": root / "fluidsrv", "fluidsrv_plugins": root / "plugins"}}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = packages.get(name)
        if folder is None:
            return None  # submodules: the normal path finder, on the package's __path__ (inside root)
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)])


# the editable install's finder would resolve fluidsrv_plugins (and missing submodules) in the venv's tree
sys.meta_path[:] = [CheckoutFinder()] + [
    finder for finder in sys.meta_path if not type(finder).__module__.startswith("__editable__")]
import fluidsrv, fluidsrv_plugins

print({BOOTSTRAP_MARK!r} + json.dumps({{"root": str(root), "fluidsrv": fluidsrv.__file__,
      "fluidsrv_plugins": fluidsrv_plugins.__file__}}), file=sys.stderr, flush=True)
from fluidsrv.cli import main

sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def checked_imports(log_path: Path, checkout: Path) -> dict[str, str]:
    """Return the paths the bootstrap logged; raise unless fluidsrv and fluidsrv_plugins came from ``checkout``."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.startswith(BOOTSTRAP_MARK)]
    if not lines:
        raise RuntimeError(f"the server of {checkout} logged no import paths")
    imported: dict[str, str] = json.loads(lines[0][len(BOOTSTRAP_MARK):])
    root = checkout.resolve()
    for package in ("fluidsrv", "fluidsrv_plugins"):
        if not Path(imported[package]).resolve().is_relative_to(root):
            raise RuntimeError(f"the server of {root} imported {package} from {imported[package]}")
    return imported


@contextmanager
def serve(generator: str, device: str, env: Mapping[str, str], log_path: Path,
          checkout: Path | None = None) -> Iterator[str]:
    """Run ``fluidsrv serve`` with ``env``, logging to ``log_path``; yield its base URL once /api/health answers.

    ``checkout``: run the server of that checkout of the repository instead of this one (see the module's doc).
    """
    port = free_port()
    arguments = ["serve", "--port", str(port), "--generator", generator, "--device", device]
    if checkout is None:
        command = [sys.executable, "-c", "import sys; from fluidsrv.cli import main; sys.exit(main())", *arguments]
    else:
        command = [sys.executable, "-c", CHECKOUT_BOOTSTRAP, str(checkout.resolve()), *arguments]
    log = log_path.open("wb")
    server = subprocess.Popen(command, env=dict(env), cwd=checkout or REPO_ROOT, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if server.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"fluidsrv serve exited with status {server.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fluidsrv serve did not start in time") from None
                time.sleep(0.5)
        if checkout is not None:
            checked_imports(log_path, checkout)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
