"""Issue 21: an offline machine and a slow start.

(A) Without the Hub, loading a model waited ~23 s on huggingface_hub's retries ("... thrown while
requesting HEAD .../adapter_config.json", "Retrying in 1s [Retry 1/5]" ... 8s): with peft installed,
transformers looks for an adapter on the Hub even under `local_files_only=True`, before randbp's
quick reachability check was consulted. Now the check comes first, once per process, and a Hub
that cannot be reached puts the whole process offline (one line on stderr says so).

Every test here runs in a fresh subprocess (the offline switches are process-wide) against an
endpoint on 127.0.0.1 that refuses connections, or one whose name lookup fails or hangs because
the subprocess says so: nothing leaves the machine. A stand-in `peft` package (transformers only
asks whether it is importable) brings back the adapter lookup that retried.

(B) `randbp --help` took 3-4 s: importing the CLI imported torch, transformers and rich's
progress bars. It now imports none of them.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RETRY_WORDS = ("Retrying in", "Retry ", "thrown while requesting")


def _closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(tmp_path: Path, endpoint: str) -> dict:
    """A fresh process's environment: not offline, the Hub at `endpoint`, an empty cache, peft importable."""
    fake = tmp_path / "site"
    (fake / "peft").mkdir(parents=True, exist_ok=True)
    (fake / "peft" / "__init__.py").write_text('__version__ = "0.18.0"  # a stand-in: transformers only looks\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
           and not k.endswith("_PROXY") and not k.endswith("_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(fake),
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    return env


# Runs in the subprocess: counts every connection attempt and name lookup for the endpoint's host;
# FAULT "dns" makes that lookup fail as on a machine without a resolver, "hang" makes it hang.
PRELUDE = textwrap.dedent("""
    import json, os, socket, sys, time
    from urllib.parse import urlparse

    FAULT = os.environ.get("RANDBP_TEST_FAULT", "")
    HOST = urlparse(os.environ["HF_ENDPOINT"]).hostname
    attempts = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.create_connection

    def getaddrinfo(host, *args, **kwargs):
        if host == HOST:
            attempts.append("lookup")
            if FAULT == "dns":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            if FAULT == "hang":
                time.sleep(60)
        return real_getaddrinfo(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        if address[0] == HOST:
            attempts.append("connect")
        return real_connect(address, *args, **kwargs)

    socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection
""")

LOAD_MODELS = PRELUDE + textwrap.dedent("""
    from randbp_cli.errors import ModelNotFoundError
    from randbp_cli.data.models import load_model

    offline = sys.argv[1] == "offline"
    times, sources = [], []
    for name in ("roberta-tiny", "prajjwal1/bert-tiny", "roberta-tiny"):
        start = time.perf_counter()
        try:
            sources.append(load_model(name, offline=offline).source)
        except ModelNotFoundError as err:
            sources.append("error: " + str(err))
        times.append(time.perf_counter() - start)
    from huggingface_hub import constants
    print(json.dumps({"times": times, "sources": sources, "attempts": attempts,
                      "hub_offline": constants.HF_HUB_OFFLINE, "env_offline": os.environ.get("HF_HUB_OFFLINE")}))
""")


def _run(tmp_path, code: str, *args: str, fault: str = "", timeout: float = 120) -> tuple[dict, str, float]:
    port = _closed_port()
    host = "127.0.0.1" if not fault else "randbp-no-such-host.invalid"
    env = _environment(tmp_path, f"http://{host}:{port}")
    env["RANDBP_TEST_FAULT"] = fault
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, wall


def _no_retries(stderr: str) -> None:
    retried = [line for line in stderr.splitlines() if any(word in line for word in RETRY_WORDS)]
    assert not retried, retried


@pytest.mark.parametrize("fault", ["", "dns", "hang"], ids=["refused", "name-not-known", "lookup-hangs"])
def test_an_unreachable_hub_is_found_out_once_then_the_process_runs_offline(tmp_path, fault):
    out, stderr, _ = _run(tmp_path, LOAD_MODELS, "online", fault=fault)
    _no_retries(stderr)
    assert out["sources"][0] == out["sources"][2] == "builtin-config"
    assert out["sources"][1].startswith("error: unknown model 'prajjwal1/bert-tiny'")
    assert "the Hub is unreachable" in out["sources"][1]
    # one look at the Hub (a name lookup, and one connection when the name resolves), never another
    assert out["attempts"].count("lookup") == 1 and out["attempts"].count("connect") <= 1, out["attempts"]
    assert out["hub_offline"] is True and out["env_offline"] == "1"  # and for any process it starts
    said = [line for line in stderr.splitlines() if "Hub" in line]
    assert len(said) == 1 and "offline" in said[0] and "cannot be reached" in said[0], stderr
    assert sum(out["times"]) < 10, out["times"]  # was ~28 s: five retries per adapter lookup


def test_offline_option_switches_the_process_offline_without_looking(tmp_path):
    """--offline (offline=True) never probes, never retries, and says nothing: the user asked for it."""
    out, stderr, _ = _run(tmp_path, LOAD_MODELS, "offline")
    _no_retries(stderr)
    assert out["attempts"] == [] and out["hub_offline"] is True
    assert "--offline" in out["sources"][1]
    assert "Hub" not in stderr, stderr
    assert sum(out["times"]) < 10, out["times"]


def test_profile_on_an_offline_machine_says_so_once_and_never_retries(tmp_path):
    """The command from the issue, on the tiny built-in architecture."""
    code = PRELUDE + textwrap.dedent("""
        sys.argv = ["randbp", "profile", "--model", "roberta-tiny", "--rho", "0.5", "--steps", "1", "--warmup", "0",
                    "--device", "cpu", "-b", "2", "--seq-len", "8", "--json"]
        from randbp_cli.cli.main import main
        try:
            main()
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        print(json.dumps({"attempts": attempts}))
    """)
    out, stderr, wall = _run(tmp_path, code, fault="dns")
    _no_retries(stderr)
    assert out["attempts"].count("lookup") == 1 and out["attempts"].count("connect") <= 1, out["attempts"]
    said = [line for line in stderr.splitlines() if "Hub" in line]
    assert len(said) == 1 and "offline" in said[0], stderr


# ---------------------------------------------------------------------------- (B) startup

HEAVY = ("torch", "transformers", "datasets", "rich.progress", "matplotlib", "randbp_cli.run.engine",
         "randbp_cli.commands.profile", "randbp_cli.commands.finetune", "randbp_cli.commands.variance")


@pytest.mark.parametrize("argv", [["--help"], ["profile", "--help"], ["finetune", "--help"], ["variance", "--help"],
                                  ["check", "--help"], ["report", "--help"], ["--version"]])
def test_help_imports_no_torch_transformers_or_progress_bars(argv):
    code = textwrap.dedent(f"""
        import io, json, sys, contextlib
        sys.argv = ["randbp", *{argv!r}]
        from randbp_cli.cli.main import main
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            try:
                main()
            except SystemExit as exit:
                code = exit.code
        heavy = [name for name in {HEAVY!r} if name in sys.modules]
        print(json.dumps({{"code": code, "heavy": heavy, "text": text.getvalue()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["code"] in (0, None) and out["text"].strip(), out
    assert out["heavy"] == [], out["heavy"]


def test_importing_the_package_imports_no_torch_until_a_name_is_used():
    code = textwrap.dedent("""
        import json, sys
        import randbp_cli
        before = [m for m in ("torch", "transformers", "rich", "typer") if m in sys.modules]
        import randbp_cli.run.methods  # binds the submodule randbp_cli.core.convert on the package
        from randbp_cli import convert, RandomizedLinear
        import randbp_cli as package
        print(json.dumps({"before": before, "convert": callable(convert) and convert.__module__,
                          "attribute": getattr(package.convert, "__module__", None),
                          "all": sorted(n for n in package.__all__ if getattr(package, n, None) is None),
                          "dir": sorted(set(package.__all__) - set(dir(package)))}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == []
    assert out["convert"] == out["attribute"] == "randbp_cli.core.convert"  # the function, not the module
    assert out["all"] == [] and out["dir"] == []
