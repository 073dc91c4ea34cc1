"""Check the project's DVC remote on Azure Blob, and run `dvc push` / `dvc pull` with bounded waits.

Why this exists: with dvc-azure 3.1, a remote that cannot be reached is retried per file by the Azure
SDK (about a minute each, timeouts not configurable through `dvc remote modify`), so a push of a few
hundred files to a dead endpoint runs for most of an hour; wrong or missing credentials end in
`unexpected error` lines that do not say which setting to fix. This module

- resolves the remote exactly as DVC does (`.dvc/config`, `.dvc/config.local`, AZURE_STORAGE_* and
  Azure identity environment variables) and talks to it once, with short timeouts and one retry,
  naming the setting to fix when something is wrong (`pcb-aoi-remote check`);
- runs `dvc push` / `dvc pull` after that check, probing the endpoint while DVC works, and stops DVC
  when the endpoint has not answered for `--outage-after` seconds (`pcb-aoi-remote push|pull`).

A stopped push leaves only complete blobs behind (Azure commits a blob when its upload finishes, and
DVC names it by its content hash), so the next push uploads exactly the missing ones.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# One retry, one second apart, 5 s to connect, 20 s to read: a check answers in well under a minute.
CLIENT_OPTIONS = {"retry_total": 1, "initial_backoff": 1, "increment_base": 1,
                  "connection_timeout": 5, "read_timeout": 20}


class RemoteError(Exception):
    """The remote cannot be used; the message says which setting to fix."""


@dataclass
class Target:
    """One Azure Blob remote as DVC resolves it: where it points and how it logs in."""
    name: str
    url: str               # azure://container/path
    container: str
    prefix: str            # path inside the container ("" for the container root)
    method: str            # connection string | account key | SAS token | service principal | Azure identity | anonymous
    setting: str           # where that method's secret comes from, as the user would change it
    endpoint: str          # the Blob service URL the requests go to
    fs: object             # adlfs AzureBlobFileSystem built by dvc-azure (holds the resolved credentials)

    def client(self):
        """An async ContainerClient with this module's short timeouts (a new one per call)."""
        from azure.storage.blob.aio import BlobServiceClient

        fs = self.fs
        if fs.connection_string:
            service = BlobServiceClient.from_connection_string(fs.connection_string, **CLIENT_OPTIONS)
        elif fs.credential is not None or fs.account_key:
            cred = fs.credential if fs.credential is not None else {"account_name": fs.account_name,
                                                                     "account_key": fs.account_key}
            service = BlobServiceClient(fs.account_url, credential=cred, **CLIENT_OPTIONS)
        elif fs.sas_token:
            service = BlobServiceClient(fs.account_url + "?" + fs.sas_token.lstrip("?"), **CLIENT_OPTIONS)
        else:
            service = BlobServiceClient(fs.account_url, **CLIENT_OPTIONS)
        return service.get_container_client(self.container)


def _origin(config: dict, name: str, key: str, *env: str) -> str:
    """How the user changes setting ``key``: the DVC config or the environment variable that set it."""
    if config.get(key):
        return f"`{key}` of remote '{name}' (dvc remote modify --local {name} {key} ...)"
    for var in env:
        if os.environ.get(var):
            return f"the environment variable {var}"
    return f"`{key}` of remote '{name}' (or {' / '.join(env)})"


def _only_remote(remotes: dict) -> str:
    """The repository's one remote, used when no default is set. The project commits no default remote
    (.dvc/config says why: `dvc exp run` on a clone without cache would wait on it), so this is the
    usual case on a clone, in CI and on AzureML."""
    from dvc.config import NoRemoteError

    if len(remotes) == 1:
        return next(iter(remotes))
    raise NoRemoteError(
        f"no default remote and {len(remotes)} remotes ({', '.join(remotes) or 'none'}): pass -r <name>, or set "
        f"one with `dvc remote default --local <name>`" if remotes else
        "no remote: add one with `dvc remote add <name> azure://<container>/<path>`")


def resolve(root: str | Path = ".", remote: str | None = None) -> Target | None:
    """The Azure remote ``remote`` (default: the default remote, else the only remote) of the DVC repo at
    ``root``, or None when that remote is not on Azure. Raises RemoteError for a missing remote or missing
    credentials."""
    from dvc.config import NoRemoteError, RemoteConfigError
    from dvc.repo import Repo
    from dvc_objects.fs.errors import AuthError

    try:
        repo = Repo(str(root))
    except Exception as e:
        raise RemoteError(f"{root}: not a DVC repository ({type(e).__name__}: {e})") from None
    try:
        name = remote or repo.config["core"].get("remote") or _only_remote(repo.config["remote"])
        if name not in repo.config["remote"]:
            raise RemoteConfigError(f"remote '{name}' does not exist in .dvc/config (`dvc remote list`)")
        config = dict(repo.config["remote"][name])
        url = config["url"]
        if not url.startswith("azure://"):
            return None
        from dvc.fs import get_cloud_fs

        cls, fs_config, path = get_cloud_fs(repo.config, name=name)
        fs = cls(**fs_config).fs  # adlfs, built with the credentials dvc-azure resolved
    except (NoRemoteError, RemoteConfigError) as e:
        raise RemoteError(str(e)) from None
    except AuthError as e:
        raise RemoteError(
            f"remote '{name}' ({url}) has no credentials: {e} Set one of: AZURE_STORAGE_CONNECTION_STRING; "
            f"AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN; or "
            f"`dvc remote modify {name} account_name <account>` and log in with an Azure identity "
            f"(az login, a service principal's AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID, a managed "
            f"identity). Secrets go in `dvc remote modify --local`, never in .dvc/config.") from None
    finally:
        repo.close()
    container, _, prefix = path.partition("/")
    if fs.connection_string:
        method, setting = "connection string", _origin(config, name, "connection_string",
                                                       "AZURE_STORAGE_CONNECTION_STRING")
    elif fs.credential is not None and fs.client_id and fs.client_secret:
        method, setting = "service principal", _origin(config, name, "client_secret", "AZURE_STORAGE_CLIENT_SECRET")
    elif fs.credential is not None:
        method = "Azure identity (DefaultAzureCredential)"
        setting = ("the identity: AZURE_CLIENT_ID (on AzureML: =$DEFAULT_IDENTITY_CLIENT_ID), `az login`, or "
                   "AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID, and its role on the account "
                   "(Storage Blob Data Contributor)")
    elif fs.account_key:
        method, setting = "account key", _origin(config, name, "account_key", "AZURE_STORAGE_KEY",
                                                 "AZURE_STORAGE_ACCOUNT_KEY")
    elif fs.sas_token:
        method, setting = "SAS token", _origin(config, name, "sas_token", "AZURE_STORAGE_SAS_TOKEN")
    else:
        method, setting = "anonymous", f"`allow_anonymous_login` of remote '{name}'"
    endpoint = fs.service_client.url.split("?")[0].rstrip("/")
    return Target(name, url, container, prefix, method, setting, endpoint, fs)


def _explain(t: Target, e: BaseException, timeout: float) -> str:
    """One message for an exception of the Azure SDK: what went wrong and which setting to fix."""
    from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceNotFoundError,
                                       ServiceRequestError, ServiceResponseError)

    where = f"remote '{t.name}' ({t.url} at {t.endpoint}, {t.method})"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return (f"{where}: no answer within {timeout:g} s. Check the endpoint (account_name, or BlobEndpoint in "
                f"the connection string) and the network/firewall; the service may be down.")
    if isinstance(e, ServiceRequestError):
        return (f"{where}: cannot reach the endpoint ({first}). Check the account name / BlobEndpoint set by "
                f"{t.setting if t.method == 'connection string' else 'account_name'}, and the network.")
    if isinstance(e, ResourceNotFoundError) and getattr(e, "error_code", None) == "ContainerNotFound":
        return (f"{where}: container '{t.container}' does not exist in this account. Create it "
                f"(az storage container create -n {t.container}) or fix the url: "
                f"dvc remote modify {t.name} url azure://<container>/<path>.")
    if isinstance(e, ClientAuthenticationError) and getattr(e, "response", None) is None:
        return (f"{where}: could not get a token: {first}. Fix {t.setting}; or use a key, SAS token or "
                f"connection string instead. On AzureML: identity: managed and "
                f"AZURE_CLIENT_ID=$DEFAULT_IDENTITY_CLIENT_ID.")
    if isinstance(e, HttpResponseError) and e.status_code in (401, 403):
        code = getattr(e, "error_code", None) or e.reason
        code = getattr(code, "value", code)  # azure-storage gives an enum
        return (f"{where}: the service refused the credentials ({e.status_code} {code}). They are wrong, "
                f"expired or lack permission (a SAS token needs read, list, write; an identity the "
                f"'Storage Blob Data Contributor' role): fix {t.setting}.")
    if isinstance(e, (HttpResponseError, ServiceResponseError)):
        return f"{where}: the service answered with an error: {type(e).__name__}: {first}"
    return f"{where}: {type(e).__name__}: {first}"


async def _probe(t: Target, write: bool) -> None:
    async with t.client() as c:
        pages = c.list_blobs(name_starts_with=t.prefix, results_per_page=1).by_page()
        async for page in pages:  # one request: proves endpoint, credentials, container, list permission
            async for _ in page:
                break
            break
        if write:  # a tiny blob outside DVC's files/ tree, deleted again
            blob = f"{t.prefix}/.pcb-aoi-check/{uuid.uuid4().hex}".lstrip("/")
            await c.upload_blob(blob, b"pcb-aoi remote check\n", overwrite=True)
            try:
                await c.delete_blob(blob)
            except Exception:  # no delete permission: a few bytes stay, harmless to DVC
                pass


def probe(t: Target, write: bool = False, timeout: float = 30) -> str | None:
    """None when the remote answers (and takes a write, if asked) within ``timeout`` s, else the reason."""
    async def bounded():
        await asyncio.wait_for(_probe(t, write), timeout)

    try:
        asyncio.run(bounded())
    except Exception as e:
        return _explain(t, e, timeout)
    return None


def check(root: str | Path = ".", remote: str | None = None, write: bool = False, timeout: float = 30) -> str:
    """Raise RemoteError naming the setting to fix, or return a one-line description of the working remote."""
    t = resolve(root, remote)
    if t is None:
        return "the remote is not on Azure Blob: nothing to check"
    error = probe(t, write, timeout)
    if error:
        raise RemoteError(error)
    return f"remote '{t.name}' ({t.url} at {t.endpoint}) answers, {t.method}, {'read+write' if write else 'read'} ok"


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to DVC (it cleans up), then kill if it does not stop within 10 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def guarded(command: str, dvc_args: list[str], root: str | Path = ".", remote: str | None = None,
            outage_after: float = 30, probe_every: float = 5) -> int:
    """Run `dvc <command> <dvc_args>` in ``root``; stop it once the remote has not answered for
    ``outage_after`` s. Returns the exit code (1 after such a stop)."""
    t = resolve(root, remote)
    if t is not None:
        error = probe(t, write=command == "push", timeout=min(30.0, outage_after))
        if error:
            raise RemoteError(error)
    name = t.name if t is not None else remote  # explicit: with no default remote, dvc needs -r
    args = [sys.executable, "-m", "dvc", command, *(["-r", name] if name else []), *dvc_args]
    proc = subprocess.Popen(args, cwd=root)
    down_since, reason = None, ""
    try:
        while proc.poll() is None:
            try:
                proc.wait(probe_every)
                break
            except subprocess.TimeoutExpired:
                pass
            if t is None:
                continue
            reason = probe(t, timeout=min(10.0, outage_after)) or ""
            down_since = (down_since or time.monotonic()) if reason else None
            if down_since is not None and time.monotonic() - down_since >= outage_after:
                _stop(proc)
                raise RemoteError(
                    f"`dvc {command}` stopped: the remote did not answer for {outage_after:g} s: {reason} "
                    + ("Every blob already uploaded is complete and counts as pushed; run "
                       "`pcb-aoi-remote push` again when the remote is back and it uploads the rest."
                       if command == "push" else
                       "Files not yet downloaded are not in the cache; run `pcb-aoi-remote pull` again."))
    except KeyboardInterrupt:
        _stop(proc)
        return 130
    if proc.returncode and t is not None:
        error = probe(t, write=command == "push", timeout=min(30.0, outage_after))
        if error:
            print(f"error: {error}", file=sys.stderr)
    return proc.returncode


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pcb-aoi-remote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  pcb-aoi-remote check\n  pcb-aoi-remote check --write -r storage\n"
               "  pcb-aoi-remote push            # = checked, bounded `dvc push`\n"
               "  pcb-aoi-remote pull -- --run-cache   # arguments after -- go to dvc")
    ap.add_argument("command", choices=["check", "push", "pull"],
                    help="check: talk to the remote once; push/pull: check, then dvc push/pull, stopped on an outage")
    ap.add_argument("dvc_args", nargs="*", help="extra arguments for dvc push/pull (after --)")
    ap.add_argument("-r", "--remote", help="remote name (default: the default remote, else the only remote)")
    ap.add_argument("-C", "--root", default=".", help="the DVC repository (default: %(default)s)")
    ap.add_argument("--write", action="store_true", help="check: also write (and delete) a tiny blob")
    ap.add_argument("--timeout", type=float, default=30, help="check: give up after this many seconds (default: %(default)s)")
    ap.add_argument("--outage-after", type=float, default=30,
                    help="push/pull: stop DVC when the remote has not answered for this many seconds (default: %(default)s)")
    ap.add_argument("--probe-every", type=float, default=5,
                    help="push/pull: seconds between probes of the remote (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    for value, flag in ((a.timeout, "--timeout"), (a.outage_after, "--outage-after"), (a.probe_every, "--probe-every")):
        if value <= 0:
            parser().error(f"{flag} must be > 0 seconds, got {value:g}")
    try:
        if a.command == "check":
            print(check(a.root, a.remote, a.write, a.timeout))
            return 0
        return guarded(a.command, a.dvc_args, a.root, a.remote, a.outage_after, a.probe_every)
    except RemoteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
