"""`./dev`, the README's set-up commands: which torch it installs on which machine, and what it runs.

The venv's python, `nvidia-smi` and `uname` are stubs that log their arguments, so the decisions are checked in
milliseconds without installing anything. (CI runs the real thing: `.ci/run` calls `./dev test`.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEV = Path(__file__).resolve().parents[1] / "dev"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

PYTHON_STUB = """#!/bin/sh
echo "$*" >>"$STUB_LOG"
case "$*" in
  "-c import torch") [ -f "$STUB_STATE/torch" ] ;;
  -c*) PYTHONPATH="$STUB_TORCH" exec "$STUB_REAL_PYTHON" "$@" ;;  # the script's own Python, over a fake torch
  *download.pytorch.org*) [ -z "${STUB_CPU_INDEX_DOWN:-}" ] && touch "$STUB_STATE/torch" ;;
  "-m pip install -q torch"*) touch "$STUB_STATE/torch" ;;
esac
"""


@pytest.fixture
def machine(tmp_path):
    if shutil.which("sh") is None:
        pytest.skip("no POSIX shell")
    venv, stubs, state = tmp_path / "venv", tmp_path / "stubs", tmp_path / "state"
    for d in (venv / "bin", stubs, state):
        d.mkdir(parents=True)
    for path, text in [(venv / "bin" / "python", PYTHON_STUB),
                       (venv / "bin" / "prefpipe", '#!/bin/sh\necho "prefpipe $*" >>"$STUB_LOG"\n'),
                       (stubs / "uname", "#!/bin/sh\necho Linux\n"),
                       (stubs / "nvidia-smi", '#!/bin/sh\n[ -n "${STUB_GPU:-}" ] && echo "GPU 0: NVIDIA H100 (UUID: x)"'
                                              ' || exit 9\n')]:
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "log"
    fake_torch = tmp_path / "fake-torch"
    fake_torch.mkdir()
    (fake_torch / "torch.py").write_text(
        "import os\n__version__ = '9.9+cu124' if os.environ.get('STUB_GPU') else '9.9+cpu'\n"
        "class version:\n    cuda = '12.4' if os.environ.get('STUB_GPU') else None\n")

    def dev(*args, torch_installed=False, **env):
        if torch_installed:
            (state / "torch").touch()
        log.write_text("")
        full = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX")}
        full.update(PATH=f"{stubs}:{os.environ['PATH']}", VENV=str(venv), STUB_LOG=str(log), STUB_STATE=str(state),
                    STUB_TORCH=str(fake_torch), STUB_REAL_PYTHON=sys.executable)
        full.update(env)
        res = subprocess.run(["sh", str(DEV), *args], env=full, capture_output=True, text=True, timeout=60)
        return res, [line for line in log.read_text().splitlines() if line.startswith(("-m pip", "-m pytest", "-m ruff", "python3.")) or
                     line.startswith("prefpipe")]
    return dev


def _torch_installs(calls):
    return [c for c in calls if c.startswith("-m pip install") and " -e " not in c]


def test_no_gpu_gets_the_cpu_index_with_a_short_timeout(machine):
    res, calls = machine("setup")
    assert res.returncode == 0, res.stderr
    assert _torch_installs(calls) == [f"-m pip install -q --timeout 15 --retries 1 --index-url {CPU_INDEX} torch"]
    assert "-m pip install -q -e .[test]" in calls
    assert "dev: installed torch 9.9+cpu (CPU build)" in res.stderr


def test_no_gpu_falls_back_to_the_default_index_when_the_cpu_index_is_unreachable(machine):
    res, calls = machine("setup", STUB_CPU_INDEX_DOWN="1")
    assert res.returncode == 0, res.stderr
    assert _torch_installs(calls) == [f"-m pip install -q --timeout 15 --retries 1 --index-url {CPU_INDEX} torch",
                                      "-m pip install -q torch"]
    assert f"{CPU_INDEX} could not be used" in res.stderr and "installed torch" in res.stderr


def test_a_gpu_machine_gets_the_default_wheel(machine):
    res, calls = machine("setup", STUB_GPU="1")
    assert res.returncode == 0, res.stderr
    assert _torch_installs(calls) == ["-m pip install -q torch"]
    assert "dev: installed torch 9.9+cu124 (CUDA 12.4 build)" in res.stderr


def test_overrides_and_an_existing_torch(machine):
    res, calls = machine("setup", torch_installed=True)
    assert res.returncode == 0 and _torch_installs(calls) == []  # kept
    assert "dev: torch 9.9+cpu (CPU build), already in" in res.stderr
    res, calls = machine("setup", torch_installed=True, TORCH_SPEC="torch==2.13.0", TORCH_INDEX="pypi")
    assert res.returncode == 0 and _torch_installs(calls) == ["-m pip install -q torch==2.13.0"]
    res, calls = machine("setup", TORCH_SPEC="torch==2.13.0", TORCH_INDEX="https://example.org/simple")
    assert _torch_installs(calls) == ["-m pip install -q --index-url https://example.org/simple torch==2.13.0"]


def test_the_project_is_installed_once_and_demo_passes_its_options(machine):
    res, calls = machine("demo", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert calls[-2:] == ["-m pip install -q -e .", "prefpipe demo --seed 1"]
    res, calls = machine("demo", torch_installed=True)
    assert calls == ["prefpipe demo"]  # nothing reinstalled: pyproject.toml did not change
    res, calls = machine("nonsense")
    assert res.returncode == 2 and "./dev test" in res.stderr and calls == []


def test_test_installs_the_test_extra_which_serves_the_demo_too(machine):
    res, calls = machine("test", "--collect-only", "-q", torch_installed=True)
    assert res.returncode == 0, res.stderr
    assert calls == ["-m pip install -q -e .[test]", "-m pytest -q --collect-only -q"]
    res, calls = machine("demo", torch_installed=True)
    assert calls == ["prefpipe demo"]


def test_lint_runs_ruff_in_the_test_environment(machine):
    res, calls = machine("lint", torch_installed=True)
    assert res.returncode == 0, res.stderr
    assert calls == ["-m pip install -q -e .[test]", "-m ruff check"]


# A python3.99 on PATH (a version no test runs under) that answers the version checks and makes a venv holding the
# stub python.
PY399_STUB = """#!/bin/sh
echo "python3.99 $*" >>"$STUB_LOG"
case "$1" in
  -c) echo 3.99 ;;
  -m) mkdir -p "$3/bin" && cp "$STUB_VENV_PYTHON" "$3/bin/python" ;;
esac
"""


def _python399_on_path(tmp_path):
    stub = tmp_path / "stubs" / "python3.99"
    stub.write_text(PY399_STUB)
    stub.chmod(0o755)
    return str(tmp_path / "venv" / "bin" / "python")


def test_a_bare_python_version_makes_the_venv_with_that_interpreter(machine, tmp_path):
    venv_python = _python399_on_path(tmp_path)
    res, calls = machine("setup", PYTHON="3.99", VENV=str(tmp_path / "v399"), STUB_VENV_PYTHON=venv_python)
    assert res.returncode == 0, res.stderr
    assert f"python3.99 -m venv {tmp_path / 'v399'}" in calls and "-m pip install -q -e .[test]" in calls
    assert "dev: creating " + str(tmp_path / "v399") in res.stderr


def test_an_existing_venv_of_another_python_than_asked_for_is_refused(machine, tmp_path):
    venv_python = _python399_on_path(tmp_path)  # the fixture's venv answers as the Python running the tests
    res, calls = machine("setup", torch_installed=True, PYTHON="3.99", STUB_VENV_PYTHON=venv_python)
    assert res.returncode == 1 and not [c for c in calls if c.startswith("-m pip")]
    assert "not the 3.99 of PYTHON=3.99" in res.stderr
