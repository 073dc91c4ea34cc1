"""A fresh clone (no DVC cache) never waits on a remote it cannot reach.

The remote here is a socket on 127.0.0.1 that accepts connections and never answers: the worst remote,
one that neither refuses nor replies (an Azure SDK client waits on it for minutes). With a default
remote in the committed .dvc/config, `dvc exp run` on such a clone first sent a HEAD for each missing
directory listing (`.dir`) to it and sat there; the committed config names no default remote, so the
first stage starts at once, and the commands that do need the remote fail at once saying what to set."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, TINY, azurite_connection_string, copy_plot_templates, copy_project, write_params

ENV = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}  # no credential of this machine
ENV.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="test",
           GIT_COMMITTER_EMAIL="t@example.com", PYTHONUNBUFFERED="1")


class SilentEndpoint:
    """Accepts every connection on 127.0.0.1, reads what comes, never answers. ``events`` holds
    (time.monotonic(), "connect" | "data", bytes) for each connection and each chunk received."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.events: list[tuple[float, str, bytes]] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            self.events.append((time.monotonic(), "connect", b""))
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.events.append((time.monotonic(), "data", data))

    def close(self):
        self.server.close()
        for c in self.conns:
            c.close()


def sh(cwd, *cmd, check=True, timeout=300):
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def endpoint():
    e = SilentEndpoint()
    yield e
    e.close()


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory, endpoint):
    """A teammate's repo with the committed .dvc/config and a dvc.lock naming a directory output
    (data/raw), and a git clone of it: no DVC cache, the remote's credentials (a connection string) in
    .dvc/config.local pointing at the silent endpoint, as a newcomer who copied them would have it."""
    base = tmp_path_factory.mktemp("offline")
    a, b = base / "a", base / "b"
    a.mkdir()
    copy_project(a)
    write_params(a / "params.yaml", TINY)
    sh(a, "git", "init", "-q")
    sh(a, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", a / ".dvc/config")
    copy_plot_templates(a)
    sh(a, "nice", "-n", "10", "dvc", "repro", "ingest")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "ingest run")
    sh(base, "git", "clone", "-q", str(a), str(b))
    assert not (b / ".dvc/cache").exists() and not (b / "data/raw").exists()
    sh(b, "dvc", "remote", "modify", "--local", "storage", "connection_string",
       azurite_connection_string(endpoint.port))
    return b


def test_exp_run_starts_its_first_stage_without_a_request_to_the_remote(fresh_clone, endpoint):
    start = time.monotonic()
    proc = subprocess.Popen(["dvc", "exp", "run", "-S", "train.epochs=1"], cwd=fresh_clone, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), line)) for line in proc.stdout],
                              daemon=True)
    reader.start()
    stage_at = None
    try:
        deadline = start + 90
        while stage_at is None and time.monotonic() < deadline and not endpoint.events:
            stage_at = next((t for t, line in lines if "Running stage 'ingest'" in line), None)
            if proc.poll() is not None and stage_at is None:
                reader.join(5)
                stage_at = next((t for t, line in lines if "Running stage 'ingest'" in line), None)
                break
            time.sleep(0.05)
    finally:  # the first stage has started (or it failed): stop DVC and the stage it runs
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = "".join(line for _, line in lines)
    before = [e for e in endpoint.events if stage_at is None or e[0] <= stage_at]
    first = next((data[:100] for _, kind, data in before if kind == "data"), b"")
    assert not before, f"the remote got a connection before the first stage, first request {first!r}:\n{output}"
    assert stage_at is not None, f"no 'Running stage' within 90 s:\n{output}"
    print(f"first stage after {stage_at - start:.1f} s; requests to the remote: {len(endpoint.events)}")


def test_plain_pull_without_a_default_remote_does_not_wait_either(fresh_clone, endpoint):
    """`dvc pull` with no default remote (and no -r) sends nothing and stops at once; DVC's own message
    is only "Is your cache up to date?", which is why the README points to `pcb-aoi-remote pull`,
    `dvc pull -r storage` or `dvc remote default --local storage`."""
    seen = len(endpoint.events)
    t = time.monotonic()
    r = sh(fresh_clone, "dvc", "pull", check=False, timeout=60)
    seconds = time.monotonic() - t
    assert r.returncode != 0 and "data/raw" in r.stderr, r.stdout + r.stderr
    assert len(endpoint.events) == seen and seconds < 30, seconds


def test_remote_wrapper_uses_the_only_remote_and_bounds_the_wait(fresh_clone, endpoint):
    """`pcb-aoi-remote` needs no default remote (it takes the only one, and passes -r to dvc); against the
    silent endpoint it stops after its own timeout naming the endpoint setting."""
    t = time.monotonic()
    r = sh(fresh_clone, sys.executable, "-m", "pcb_aoi.remote", "pull", "--outage-after", "3",
           check=False, timeout=60)
    seconds = time.monotonic() - t
    assert r.returncode == 1, r.stdout + r.stderr
    assert "remote 'storage'" in r.stderr and "no answer within 3 s" in r.stderr and "BlobEndpoint" in r.stderr, r.stderr
    assert seconds < 30, seconds


def test_several_remotes_and_no_default_is_an_error_naming_r(fresh_clone):
    from pcb_aoi.remote import RemoteError
    from pcb_aoi.remote.dvc_remote import resolve

    sh(fresh_clone, "dvc", "remote", "add", "--local", "other", "azure://other/store")
    try:
        with pytest.raises(RemoteError, match=r"no default remote and 2 remotes \(storage, other\): pass -r"):
            resolve(fresh_clone)
        assert resolve(fresh_clone, "storage").name == "storage"
    finally:
        sh(fresh_clone, "dvc", "remote", "remove", "--local", "other")


def test_remote_wrapper_names_the_remote_to_dvc(fresh_clone, monkeypatch):
    """With no default remote, `pcb-aoi-remote push|pull` gives dvc `-r storage` (plain `dvc pull` would
    find no remote); the remote's answer is faked here, the command line DVC gets is the real one."""
    from pcb_aoi.remote import dvc_remote

    calls = []

    class Done:
        returncode = 0

        def __init__(self, args, cwd):
            calls.append(args)

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(dvc_remote, "probe", lambda *a, **k: None)
    monkeypatch.setattr(dvc_remote.subprocess, "Popen", Done)
    assert dvc_remote.guarded("pull", ["--allow-missing"], root=fresh_clone) == 0
    assert calls[0][-4:] == ["pull", "-r", "storage", "--allow-missing"], calls
