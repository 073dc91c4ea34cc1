"""Where real data comes from (``ingest.uri``): a local folder, an https archive, or Azure Blob.

Remote sources are fetched into a cache (``$PCB_AOI_CACHE``, default ``~/.cache/pcb-aoi``) keyed
by the URI, so a re-run does not download again. The DVC-native alternative, which also versions
the raw data, is ``dvc import-url`` / ``dvc add`` (see the README).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from .readers import DataError


def cache_root() -> Path:
    return Path(os.environ.get("PCB_AOI_CACHE", Path.home() / ".cache" / "pcb-aoi"))


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, timeout: float = 30) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}") as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DataError(f"ingest.uri: {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DataError(f"ingest.uri: {url}: cannot download ({getattr(e, 'reason', e)})") from None


def _extract(archive: Path, dest: Path, name: str) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
    else:
        raise DataError(f"ingest.uri: {name} is neither a zip nor a tar archive")


def fetch_https(url: str, sha256: str = "") -> Path:
    """Download and extract ``url`` once; returns the extracted folder."""
    target = cache_root() / "https" / _key(url)
    done = target / "extracted"
    if done.is_dir() and (not sha256 or (target / "sha256").read_text() == sha256):
        return done
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        archive = Path(tmp) / "archive"
        _download(url, archive)
        digest = sha256_of(archive)
        if sha256 and digest != sha256.lower():
            raise DataError(f"ingest.sha256: {url} has sha256 {digest}, expected {sha256}")
        out = Path(tmp) / "extracted"
        _extract(archive, out, url)
        shutil.rmtree(done, ignore_errors=True)
        out.rename(done)
        (target / "sha256").write_text(sha256 or digest)
    return done


def azure_filesystem():
    """adlfs file system with the credentials dvc-azure reads from the environment."""
    from adlfs import AzureBlobFileSystem

    conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if conn:
        return AzureBlobFileSystem(connection_string=conn)
    account = os.environ.get("AZURE_STORAGE_ACCOUNT")
    if not account:
        raise DataError("ingest.uri: azure:// needs AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT "
                        "plus AZURE_STORAGE_KEY / AZURE_STORAGE_SAS_TOKEN / an Azure identity")
    return AzureBlobFileSystem(account_name=account, account_key=os.environ.get("AZURE_STORAGE_KEY"),
                               sas_token=os.environ.get("AZURE_STORAGE_SAS_TOKEN"),
                               anon=False)


def fetch_azure(uri: str) -> Path:
    """Copy ``azure://container/path`` into the cache (every run: blobs may have changed)."""
    path = uri.removeprefix("azure://").strip("/")
    fs = azure_filesystem()
    try:
        if not fs.exists(path):
            raise DataError(f"ingest.uri: {uri} does not exist (container or path)")
        target = cache_root() / "azure" / _key(uri)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        files = [f for f in fs.find(path) if not f.endswith("/")]
        for f in tqdm(files, desc="download azure", unit="file"):
            local = target / os.path.relpath(f, path)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(local))
    except DataError:
        raise
    except Exception as e:  # azure-core raises many types: report which setting to look at
        raise DataError(f"ingest.uri: cannot read {uri}: {type(e).__name__}: {str(e).splitlines()[0]} "
                        "(check the container name and the AZURE_STORAGE_* credentials)") from None
    return target


def resolve(uri: str, sha256: str = "") -> Path:
    """Local folder (or file) holding the data named by ``ingest.uri``."""
    if uri.startswith("https://") or uri.startswith("http://"):
        return fetch_https(uri, sha256)
    if uri.startswith("azure://"):
        return fetch_azure(uri)
    path = Path(uri).expanduser()
    if not path.exists():
        raise DataError(f"ingest.uri: {path} does not exist")
    return path
