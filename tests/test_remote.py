"""The DVC remote on a real Azure Blob endpoint (Azurite): the committed `.dvc/config`, a round trip of
the tiny pipeline's outputs through it and a git clone, experiments through a bare git remote, an
outage in the middle of a push, and a clear, bounded error for each bad remote setting."""
import configparser
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, azurite_connection_string, copy_project, free_port, start_azurite, write_params

# Only the variables these tests set reach the subprocesses: no Azure credential of the machine's user.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
ENV.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="test",
           GIT_COMMITTER_EMAIL="t@example.com")
REMOTE = [sys.executable, "-m", "pcb_aoi.remote"]


def sh(cwd, *cmd, env=None, check=True, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def create_container(conn: str, name: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    try:
        BlobServiceClient.from_connection_string(conn).create_container(name)
    except ResourceExistsError:
        pass


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def committed_remote() -> tuple[str, str]:
    """(container, path) of the default remote in the committed .dvc/config."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    url = cfg['\'remote "storage"\'']["url"]
    container, _, path = url.removeprefix("azure://").partition("/")
    return container, path


def test_committed_config_names_the_remote_without_secrets():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    # no default remote in git: `dvc exp run` on a clone without cache would wait on it (test_offline.py)
    assert not cfg.has_option("core", "remote")
    remote = cfg['\'remote "storage"\'']
    assert remote["url"].startswith("azure://") and remote["account_name"]
    secrets = {"connection_string", "account_key", "sas_token", "client_secret", "client_id", "tenant_id"}
    assert not secrets & set(remote), "credentials belong in .dvc/config.local or the environment"
    assert "/config.local" in (ROOT / ".dvc/.gitignore").read_text().split()


# ---- round trip: tiny pipeline -> dvc push -> git clone -> dvc pull ------------------------------------

@pytest.fixture(scope="module")
def pushed(azurite, tmp_path_factory):
    """A repo with the committed .dvc/config, the tiny pipeline run and pushed, its git history in a bare
    remote. Credentials and the default remote only in .dvc/config.local, as a user would set them."""
    create_container(azurite, committed_remote()[0])
    base = tmp_path_factory.mktemp("roundtrip")
    bare, a = base / "origin.git", base / "a"
    sh(base, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    a.mkdir()
    copy_project(a)
    write_params(a / "params.yaml", TINY)
    sh(a, "git", "init", "-q", "-b", "main")
    sh(a, "dvc", "init", "-q")
    shutil.copy(ROOT / ".dvc/config", a / ".dvc/config")
    sh(a, "dvc", "remote", "modify", "--local", "storage", "connection_string", azurite)
    sh(a, "dvc", "remote", "default", "--local", "storage")  # what README "Azure" tells a teammate
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "tiny pipeline")
    sh(a, "nice", "-n", "10", "dvc", "repro")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "run")
    assert "connection_string" not in sh(a, "git", "show", "HEAD:.dvc/config").stdout
    sh(a, "git", "remote", "add", "origin", str(bare))
    sh(a, "git", "push", "-q", "origin", "main")
    sh(a, "dvc", "push")
    return a, bare, azurite


@pytest.fixture(scope="module")
def clone(pushed):
    a, bare, conn = pushed
    b = a.parent / "b"
    sh(a.parent, "git", "clone", "-q", str(bare), str(b))
    sh(b, "dvc", "remote", "modify", "--local", "storage", "connection_string", conn)
    sh(b, "dvc", "remote", "default", "--local", "storage")
    sh(b, "dvc", "pull")
    return b


def test_clone_pulls_byte_identical_outputs_and_repro_runs_nothing(pushed, clone):
    a = pushed[0]
    for folder in ("data", "models", "reports"):
        ours, theirs = files(a / folder), files(clone / folder)
        assert ours.keys() == theirs.keys() and ours, folder
        assert all(ours[k] == theirs[k] for k in ours), f"{folder}: a pulled file differs"
    assert "up to date" in sh(clone, "dvc", "status").stdout
    out = sh(clone, "dvc", "repro").stdout
    assert "Running stage" not in out, out


def test_experiment_travels_through_git_and_blob_remotes(pushed, clone):
    a = pushed[0]
    before = (a / "models/model.onnx").read_bytes()
    sh(a, "nice", "-n", "10", "dvc", "exp", "run", "-n", "opset18", "-S", "export.opset=18")
    after = (a / "models/model.onnx").read_bytes()
    assert after != before
    sh(a, "dvc", "exp", "push", "origin", "opset18")
    sh(clone, "dvc", "exp", "pull", "origin", "opset18")
    assert "opset18" in sh(clone, "dvc", "exp", "list", "--name-only").stdout
    sh(clone, "dvc", "exp", "apply", "opset18")
    assert (clone / "models/model.onnx").read_bytes() == after
    assert files(clone / "models") == files(a / "models")
    assert "Running stage" not in sh(clone, "dvc", "repro").stdout


# ---- an outage in the middle of a push -----------------------------------------------------------------

def blobs(conn: str, container: str) -> dict[str, bytes]:
    from azure.storage.blob import ContainerClient

    c = ContainerClient.from_connection_string(conn, container)
    return {b.name: c.download_blob(b.name).readall() for b in c.list_blobs()}


def test_push_survives_an_outage(tmp_path):
    """Azurite killed mid-push: the push stops with a clear error in bounded time; only complete blobs
    are left; after a restart (same port, same data) the retry uploads the rest and a pull gets it all."""
    port, data = free_port(), tmp_path / "azurite"
    conn = azurite_connection_string(port)
    server = start_azurite(port, data)
    try:
        create_container(conn, "outage")
        src = tmp_path / "src"
        (src / "d").mkdir(parents=True)
        sh(src, "git", "init", "-q")
        sh(src, "dvc", "init", "-q")
        sh(src, "dvc", "remote", "add", "-d", "storage", "azure://outage/store")
        sh(src, "dvc", "remote", "modify", "--local", "storage", "connection_string", conn)
        rng = __import__("random").Random(0)
        for i in range(600):
            (src / "d" / f"{i:04d}.bin").write_bytes(rng.randbytes(60_000))
        sh(src, "dvc", "add", "-q", "d")

        from azure.storage.blob import ContainerClient

        container = ContainerClient.from_connection_string(conn, "outage")
        push = subprocess.Popen([*REMOTE, "push", "--outage-after", "6", "--probe-every", "1"], cwd=src, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while sum(1 for _ in container.list_blobs()) < 20:
            assert push.poll() is None and time.time() < deadline, "the push ended before the outage"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)  # Azurite saves its blob index, then stops serving
        server.wait()
        killed = time.time()
        out, err = push.communicate(timeout=120)
        stopped_after = time.time() - killed
        print(f"push stopped {stopped_after:.1f} s after the outage")
        assert push.returncode == 1, out + err
        assert "did not answer" in err and "cannot reach the endpoint" in err and "pcb-aoi-remote push" in err, err

        server = start_azurite(port, data)  # same port, same data folder
        left = blobs(conn, "outage")
        assert 0 < len(left) < 601, "the outage should have cut the push short"
        for name, content in left.items():  # every blob there is whole: its name is its content's md5
            assert name.startswith("store/files/md5/"), name
            digest = name.split("/files/md5/")[1].replace("/", "").removesuffix(".dir")
            assert hashlib.md5(content).hexdigest() == digest, f"{name} is truncated or corrupt"
        missing = sh(src, "dvc", "status", "-c", check=False).stdout
        assert "new:" in missing or "missing" in missing, missing

        r = sh(src, *REMOTE, "push")
        assert len(blobs(conn, "outage")) == 601  # 600 files + the directory listing
        dst = tmp_path / "dst"
        dst.mkdir()
        sh(dst, "git", "init", "-q")
        sh(dst, "dvc", "init", "-q")
        shutil.copy(src / ".dvc/config", dst / ".dvc/config")
        shutil.copy(src / "d.dvc", dst / "d.dvc")
        sh(dst, "dvc", "remote", "modify", "--local", "storage", "connection_string", conn)
        sh(dst, *REMOTE, "pull")
        assert files(dst / "d") == files(src / "d"), r.stdout
    finally:
        server.kill()
        server.wait()


# ---- bad remote settings: a clear message naming the setting, never a hang -----------------------------

def remote_repo(tmp_path: Path, url: str, **local) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "storage", url)
    for key, value in local.items():
        sh(repo, "dvc", "remote", "modify", "--local", "storage", key, value)
    return repo


def run_check(repo: Path, *args, env=None):
    t = time.time()
    r = sh(repo, *REMOTE, "check", *args, env=env, check=False, timeout=120)
    return r, time.time() - t


def test_check_passes_on_a_working_remote(azurite, tmp_path):
    create_container(azurite, "checks")
    repo = remote_repo(tmp_path, "azure://checks/store", connection_string=azurite)
    r, _ = run_check(repo, "--write")
    assert r.returncode == 0 and "read+write ok" in r.stdout, r.stderr


def test_credentials_from_the_environment(azurite, tmp_path):
    create_container(azurite, "checks")
    repo = remote_repo(tmp_path, "azure://checks/store")
    r, _ = run_check(repo, env={**ENV, "AZURE_STORAGE_CONNECTION_STRING": azurite})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case, expect", [
    ("no credentials", ["has no credentials", "AZURE_STORAGE_CONNECTION_STRING", "dvc remote modify --local"]),
    ("wrong key", ["refused the credentials", "403", "`connection_string` of remote 'storage'"]),
    ("missing container", ["container 'nope' does not exist", "dvc remote modify storage url"]),
    ("unreachable endpoint", ["cannot reach the endpoint", "BlobEndpoint"]),
])
def test_bad_remote_settings_say_what_to_fix(azurite, tmp_path, case, expect):
    create_container(azurite, "checks")
    wrong_key = azurite.replace("AccountKey=Eby8", "AccountKey=Xby8")
    closed = azurite_connection_string(free_port())  # nothing listens there
    url, local = {
        "no credentials": ("azure://checks/store", {}),
        "wrong key": ("azure://checks/store", {"connection_string": wrong_key}),
        "missing container": ("azure://nope/store", {"connection_string": azurite}),
        "unreachable endpoint": ("azure://checks/store", {"connection_string": closed}),
    }[case]
    repo = remote_repo(tmp_path, url, **local)
    r, seconds = run_check(repo)
    print(f"{case}: {seconds:.1f} s")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for text in expect:
        assert text in r.stderr, r.stderr
    assert seconds < 60  # bounded: short timeouts and one retry, not the SDK's minute per request
    # push checks first: nothing is uploaded with a bad setting, and the message is the same
    (repo / "x.bin").write_bytes(b"x" * 1000)
    sh(repo, "dvc", "add", "-q", "x.bin")
    r = sh(repo, *REMOTE, "push", check=False, timeout=120)
    assert r.returncode == 1 and expect[0] in r.stderr, r.stderr


def test_remote_cli_rejects_bad_options(tmp_path):
    r = sh(tmp_path, *REMOTE, "check", "--timeout", "0", check=False)
    assert r.returncode == 2 and "--timeout must be > 0" in r.stderr
    r = sh(tmp_path, *REMOTE, "check", check=False)
    assert r.returncode == 1 and "not a DVC repository" in r.stderr
    assert sh(tmp_path, *REMOTE, "--help").returncode == 0


# ---- the AzureML job's script, run here against Azurite -------------------------------------------------

def test_azureml_run_script_pulls_runs_pushes_and_bundles(pushed, tmp_path):
    """azureml/run.sh as the job runs it (credentials from the environment, as the managed identity would
    give them): pull, dvc exp run with an override, push, result commit in a git bundle; a teammate then
    gets the result with git fetch + dvc pull."""
    a, bare, conn = pushed
    job, out = tmp_path / "job", tmp_path / "outputs"
    sh(tmp_path, "git", "clone", "-q", str(bare), str(job))
    commit = sh(job, "git", "rev-parse", "HEAD").stdout.strip()
    env = {**ENV, "AZURE_STORAGE_CONNECTION_STRING": conn}
    r = sh(job, "bash", str(ROOT / "azureml/run.sh"), "--commit", commit, "--name", "thr04", "--out", str(out),
           "--overrides", "evaluate.score_threshold=0.4", env=env)
    assert "Running stage 'evaluate'" in r.stdout and "Running stage 'train'" not in r.stdout, r.stdout
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["base_commit"] == commit and summary["branch"] == "azureml/thr04"

    mate = tmp_path / "mate"
    sh(tmp_path, "git", "clone", "-q", str(bare), str(mate))
    sh(mate, "git", "fetch", "-q", str(out / "result.bundle"), "azureml/thr04:azureml/thr04")
    sh(mate, "git", "checkout", "-q", "azureml/thr04")
    assert "score_threshold: 0.4" in (mate / "params.yaml").read_text()
    sh(mate, "dvc", "pull", "-r", "storage", env=env)  # a clone has no default remote
    assert "up to date" in sh(mate, "dvc", "status").stdout
    assert files(mate / "models") == files(job / "models")
    assert __import__("json").loads((mate / "reports/metrics.json").read_text()) == summary["metrics"]


def test_azureml_run_script_refuses_bad_arguments(tmp_path):
    r = sh(tmp_path, "bash", str(ROOT / "azureml/run.sh"), "--name", "x", check=False)
    assert r.returncode == 2 and "--commit, --name and --out are required" in r.stderr
