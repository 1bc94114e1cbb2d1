"""Triton Inference Server deployment: install the real ``tritonserver`` (from the ``nvidia-pytriton`` wheel), write
a model repository for an engine, start and stop the server.

Layout of an installation (default ``.triton/`` in the checkout):
``pytriton/`` (the wheel, installed with ``--no-deps --target``), ``backends/python/`` (symlinks to the Python
backend and the stub for this Python), ``venv/`` (this Python's packages plus ``numpy<2``, which the backend's
utilities need: the model runs there through ``EXECUTION_ENV_PATH``).
"""

import os
import re
from importlib import resources
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from orthrus_runtime.errors import OrthrusError

PYTRITON = "nvidia-pytriton==0.7.0"
_CHECKOUT = Path(__file__).resolve().parents[1]
# .triton beside engines/ in a checkout (editable install); a per-user cache folder for an installed package
HOME = _CHECKOUT / ".triton" if (_CHECKOUT / "pyproject.toml").exists() else \
    Path.home() / ".cache" / "orthrus-export" / "triton"
MODEL = "orthrus"

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "end_id" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "random_seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }},
  {{ name: "stop" data_type: TYPE_STRING dims: [ -1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "output_tokens" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "cycles" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "acceptance_length" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {instance_group} ]
parameters: {{ key: "ENGINE_PATH", value: {{ string_value: "{engine}" }} }}
parameters: {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{env}" }} }}
parameters: {{ key: "MAX_ACTIVE", value: {{ string_value: "{max_active}" }} }}
"""


LAUNCH = """#!/usr/bin/env bash
# Start tritonserver on this model repository, on 127.0.0.1 (ports from HTTP_PORT, GRPC_PORT, METRICS_PORT).
# Extra arguments go to tritonserver.
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
exec "{binary}" --model-repository "$here" --backend-directory "{backends}" \\
  --http-address 127.0.0.1 --grpc-address 127.0.0.1 --http-port "${{HTTP_PORT:-8000}}" \\
  --grpc-port "${{GRPC_PORT:-8001}}" --metrics-port "${{METRICS_PORT:-8002}}" "$@"
"""


def server_binary(home: Path) -> Path:
    return home / "pytriton" / "pytriton" / "tritonserver" / "bin" / "tritonserver"


def install(home: Path = HOME, quiet: bool = True) -> Path:
    """Install tritonserver and the model's Python environment under ``home`` (idempotent)."""
    home = home.resolve()
    if not server_binary(home).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), "--no-deps",
                        "--target", str(home / "pytriton"), PYTRITON], check=True)
    ts = home / "pytriton" / "pytriton" / "tritonserver"
    stub = ts / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not stub.exists():
        raise OrthrusError(f"{PYTRITON} has no Python backend stub for Python {sys.version.split()[0]}")
    py = home / "backends" / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (ts / "backends" / "python" / "libtriton_python.so",
                ts / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = py / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    venv = home / "venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", *(["-q"] if quiet else []),
                        "numpy<2"], check=True)
    link_environment(venv)
    return home


def link_environment(venv: Path) -> None:
    """Make this interpreter's packages (orthrus-export, torch, ...) visible in the model environment, after its own
    (numpy<2 must win). ``--system-site-packages`` reaches only the *base* interpreter's packages: when this Python
    is itself a virtual environment (the usual install), its site-packages are added through a ``.pth`` file that
    calls ``site.addsitedir`` (which also runs their ``.pth`` files, e.g. an editable install's finder)."""
    import site
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    ours = [d for d in site.getsitepackages() if Path(d).is_dir()]
    lines = [f"import site; site.addsitedir({d!r})" for d in ours if Path(d).resolve() != Path(out).resolve()]
    pth = Path(out) / "_orthrus_export_env.pth"
    if lines:
        pth.write_text("\n".join(lines) + "\n")
    elif pth.exists():
        pth.unlink()


def check_environment(env: Path) -> None:
    """Refuse a model environment the Python backend cannot serve from: numpy 2 breaks its BYTES tensors (every
    request then fails with "Stub process is not healthy"), and the engine's runtime must import there."""
    probe = ("import numpy, sys; v = numpy.__version__; import orthrus_runtime; print(v)")
    p = subprocess.run([str(env / "bin" / "python"), "-c", probe], capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise OrthrusError(f"the model environment {env} cannot import what the model needs ({last}): use the one "
                           "`python scripts/install_tritonserver.py` makes, or install orthrus-export and numpy<2 there")
    version = p.stdout.strip().splitlines()[-1]
    if int(version.split(".")[0]) >= 2:
        raise OrthrusError(f"the model environment {env} has numpy {version}; Triton's Python backend needs numpy<2 "
                           "(numpy 2 breaks its string tensors): `pip install 'numpy<2'` there, or use the environment "
                           "`python scripts/install_tritonserver.py` makes")


def instance_group(manifest: dict, instances: int, gpus: list[int] | None) -> str:
    """The model's ``instance_group``: ``KIND_GPU`` for a GPU engine, ``instances`` per listed GPU (``gpus``, default
    GPU 0: ``--gpus 0,1`` puts one engine on each of two GPUs); ``KIND_CPU`` for a CPU engine."""
    from orthrus_runtime.profiles import load_profile
    if instances < 1:
        raise OrthrusError("--instances must be >= 1")
    if load_profile(manifest["gpu"]["profile"]).device != "cuda":
        if gpus:
            raise OrthrusError(f"engine {manifest['name']} is a CPU engine: it runs on KIND_CPU instances; drop --gpus")
        return f"{{ count: {instances} kind: KIND_CPU }}"
    gpus = [0] if not gpus else gpus
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise OrthrusError(f"--gpus {','.join(map(str, gpus))}: give distinct GPU indices >= 0, e.g. 0,1")
    return f"{{ count: {instances} kind: KIND_GPU gpus: [ {', '.join(map(str, gpus))} ] }}"


def write_repository(engine: Path, out: Path, instances: int = 1, env: Path | None = None,
                     home: Path = HOME, gpus: list[int] | None = None, max_active: int | None = None) -> Path:
    """A model repository serving ``engine``; written to a temporary directory and renamed when complete.
    ``max_active``: requests sharing the engine's passes at once (default its max batch size; 1 serves them one
    after another: in-flight batching off)."""
    from orthrus_runtime.engine_format import atomic_directory, read_manifest
    engine = Path(engine).resolve()
    manifest = read_manifest(engine)
    group = instance_group(manifest, instances, gpus)
    limit = manifest["build"]["max_batch_size"]
    if max_active is not None and not 1 <= max_active <= limit:
        raise OrthrusError(f"--max-active {max_active}: give 1 … {limit} (the engine's --max-batch-size)")
    env = Path(env).resolve() if env else (Path(home) / "venv").resolve()
    if not (env / "bin" / "activate").exists():
        raise OrthrusError(f"no Python environment at {env}: run `python scripts/install_tritonserver.py` first "
                           "or pass --env")
    check_environment(env)
    out = Path(out)
    if out.exists():
        raise OrthrusError(f"{out} already exists: choose another --out or remove it")
    with atomic_directory(out) as tmp:
        (tmp / MODEL / "1").mkdir(parents=True)
        model_file = resources.files("orthrus_runtime") / "tritonserver_model.py"
        shutil.copy2(str(model_file), tmp / MODEL / "1" / "model.py")
        (tmp / MODEL / "config.pbtxt").write_text(CONFIG.format(name=MODEL, instance_group=group, engine=engine,
                                                                env=env, max_active=max_active or ""))
        home = Path(home).resolve()
        launch = tmp / "launch.sh"
        launch.write_text(LAUNCH.format(libs=home / "pytriton" / "nvidia_pytriton.libs", binary=server_binary(home),
                                        backends=home / "backends"))
        launch.chmod(0o755)
    return out


class Server:
    """A running tritonserver on 127.0.0.1 ports; stop() ends it by its PID.

    ``supervise``: the server runs with explicit model control and :meth:`watch` (started by :meth:`wait_ready`)
    checks every ``interval`` seconds that the model's Python-backend stub processes are alive. Triton 2.51 neither
    restarts a stub that died (SIGKILL, the OOM killer, a crash in native code) nor reports the model unready: every
    request then fails with "Stub process … is not healthy" while ``/v2/models/orthrus/ready`` answers 200. The
    watcher unloads the model at once (readiness then answers 400 "not ready", so a load balancer or Kubernetes
    probe stops sending traffic) and loads it again (a fresh stub and engine; ready again when loaded). A reload
    that fails leaves the model unloaded and unready, and the watcher stops. Each step is an entry in ``events``
    (and passed to ``on_event``)."""

    def __init__(self, repo: Path, http: int, grpc: int, metrics: int, home: Path = HOME,
                 log: Path | None = None, supervise: bool = False, on_event=None):
        home = Path(home).resolve()
        binary = server_binary(home)
        if not binary.exists():
            raise OrthrusError(f"tritonserver is not installed under {home}: run "
                               "`python scripts/install_tritonserver.py`")
        self.http, self.grpc, self.metrics = http, grpc, metrics
        for flag, port in (("--http-port", http), ("--grpc-port", grpc), ("--metrics-port", metrics)):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    raise OrthrusError(f"port {port} on 127.0.0.1 is already in use (another server?): choose another "
                                       f"{flag}") from None
        env = dict(os.environ, LD_LIBRARY_PATH=str(home / "pytriton" / "nvidia_pytriton.libs"))
        self.log_path = Path(log) if log else None
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.supervise, self.on_event = supervise, on_event
        self.events: list[str] = []
        self.reloads = 0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        control = ["--model-control-mode=explicit", f"--load-model={MODEL}"] if supervise else []
        self.proc = subprocess.Popen(
            [str(binary), "--model-repository", str(Path(repo).resolve()), "--backend-directory",
             str(home / "backends"), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--exit-timeout-secs", "5", *control], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    # ---- supervision ----------------------------------------------------------------------------------------------
    def stub_processes(self) -> dict[int, str]:
        """The server's Python-backend stub processes: pid -> model instance name (e.g. ``orthrus_0_0``)."""
        out = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if f"PPid:\t{self.proc.pid}\n" not in (proc / "status").read_text():
                    continue
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:  # the process ended while we looked
                continue
            if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 8:
                out[int(proc.name)] = argv[8].decode(errors="replace")
        return out

    def _request(self, path: str, post: bool = False, timeout: float = 5.0) -> int:
        """HTTP status of a request to the server (0 when it does not answer)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=b"{}" if post else None,
                                     method="POST" if post else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def model_ready(self) -> bool:
        return self._request(f"/v2/models/{MODEL}/ready") == 200

    def _event(self, message: str) -> None:
        self.events.append(message)
        if self.on_event is not None:
            self.on_event(message)

    def watch(self, interval: float = 0.5, reload_timeout: float = 900.0) -> None:
        """Start the stub watcher (a daemon thread; see the class docstring)."""
        if self._watcher is not None:
            return
        expected = self.stub_processes()

        def loop():
            nonlocal expected
            while not self._stopping.wait(interval):
                if self.proc.poll() is not None:
                    return
                alive = self.stub_processes()
                dead = {pid: name for pid, name in expected.items() if pid not in alive}
                if not dead or self._stopping.is_set():
                    continue
                names = ", ".join(f"{name} (pid {pid})" for pid, name in dead.items())
                self._event(f"model process {names} died: model '{MODEL}' unloaded (not ready), reloading it")
                self._request(f"/v2/repository/models/{MODEL}/unload", post=True)
                t0 = time.monotonic()
                status = self._request(f"/v2/repository/models/{MODEL}/load", post=True, timeout=reload_timeout)
                if self._stopping.is_set():
                    return
                if status != 200 or not self.model_ready():
                    self._event(f"reloading model '{MODEL}' failed (HTTP {status}): it stays unloaded and not "
                                "ready; see the server log")
                    return
                expected = self.stub_processes()
                self._event(f"model '{MODEL}' reloaded in {time.monotonic() - t0:.1f} s: ready again")
                self.reloads += 1  # after the event: a caller that sees the count also sees the event

        self._watcher = threading.Thread(target=loop, daemon=True, name="tritonserver-watch")
        self._watcher.start()

    def model_load_seconds(self) -> list[float]:
        """Each model instance's engine load time, as the model logged it ("orthrus: engine … loaded in N s")."""
        if self.log_path is None or not self.log_path.exists():
            return []
        found = re.findall(r"orthrus: engine \S+ loaded in ([0-9.]+) s", self.log_path.read_text(errors="replace"))
        return [float(x) for x in found]

    def decisive_lines(self, n: int = 3) -> list[str]:
        """The log lines that say why the server failed (model load errors, bind errors, import errors)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        keys = ("error", "failed", "address already in use", "modulenotfounderror", "importerror", "unhealthy")
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
        hits = [ln for ln in lines if any(k in ln.lower() for k in keys)]
        return hits[:n]

    def failure(self) -> OrthrusError:
        """The error for a server that exited by itself: its code, where the log is, the log's decisive lines."""
        if self.log is not subprocess.DEVNULL:
            self.log.flush()
        why = self.decisive_lines()
        where = f" (log: {self.log_path})" if self.log_path else ""
        return OrthrusError(f"tritonserver exited with code {self.proc.returncode}{where}"
                            + (": " + " | ".join(why) if why else ""))

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the server (and its model) is ready; a supervised server then starts its watcher."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.failure()
            if self._request("/v2/health/ready", timeout=2) == 200:
                if self.supervise:
                    self.watch()
                return
            time.sleep(0.5)
        self.stop()
        raise OrthrusError(f"tritonserver was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        self._stopping.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
