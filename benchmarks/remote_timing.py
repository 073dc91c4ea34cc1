"""Time `dvc push` and `dvc pull` of the default pipeline's outputs through Azure Blob (Azurite on
127.0.0.1), from a clone of this repository whose DVC cache holds them.

  python benchmarks/remote_timing.py                      # uses this checkout's .dvc/cache (run `make repro` first)
  python benchmarks/remote_timing.py --cache /path/.dvc/cache --jobs 4

Prints one JSON line: files and MB pushed, seconds for push, pull into a fresh clone, a no-op push, and
the same push/pull through `pcb-aoi-remote` (check + probes). Azurite runs on this machine, so the
numbers measure DVC + dvc-azure + the Blob protocol, not a network link.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import azurite_connection_string, free_port  # noqa: E402

AZURITE = ROOT / "node_modules" / ".bin" / "azurite-blob"


def timed(cwd, *cmd, env, partial=False):
    """Seconds ``cmd`` took. partial: outputs missing from the cache are not an error (reported once)."""
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode and partial and "missing" in r.stderr:
        print(f"note: {' '.join(cmd[:4])}: some outputs are not in the cache, timed without them", file=sys.stderr)
    elif r.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(ROOT / ".dvc/cache"), help="DVC cache holding the outputs (copied, read only)")
    ap.add_argument("--jobs", type=int, help="dvc push/pull -j (default: DVC's)")
    ap.add_argument("--partial", action="store_true",
                    help="time what the cache has when some outputs of dvc.lock are missing from it")
    a = ap.parse_args()
    if not AZURITE.exists():
        sys.exit("error: Azurite not installed: npm install --no-save azurite@3")
    if not Path(a.cache).is_dir():
        sys.exit(f"error: {a.cache}: no DVC cache (run `make repro` first, or pass --cache)")
    jobs = ["-j", str(a.jobs)] if a.jobs else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = free_port()
        server = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                                   str(tmp / "azurite"), "--silent", "--skipApiVersionCheck", "--disableTelemetry"])
        try:
            time.sleep(3)
            conn = azurite_connection_string(port)
            from azure.storage.blob import BlobServiceClient

            env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": conn, "DVC_NO_ANALYTICS": "1"}
            src, dst = tmp / "src", tmp / "dst"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(src)], check=True)
            container = subprocess.run(["dvc", "config", "remote.storage.url"], cwd=src, env=env, capture_output=True,
                                       text=True, check=True).stdout.strip().removeprefix("azure://").split("/")[0]
            BlobServiceClient.from_connection_string(conn).create_container(container)
            shutil.copytree(a.cache, src / ".dvc/cache")
            out = {"push_s": timed(src, "dvc", "push", "-r", "storage", *jobs, env=env, partial=a.partial)}
            blobs = list(BlobServiceClient.from_connection_string(conn).get_container_client(container).list_blobs())
            out["files"] = len(blobs)
            out["mb"] = round(sum(b.size for b in blobs) / 1e6, 1)
            out["noop_push_s"] = timed(src, "dvc", "push", "-r", "storage", *jobs, env=env, partial=a.partial)
            subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True)
            out["pull_s"] = timed(dst, "dvc", "pull", "-r", "storage", *jobs, *(["--allow-missing"] if a.partial else []), env=env)
            shutil.rmtree(dst / ".dvc/cache")
            for d in ("data", "models"):
                shutil.rmtree(dst / d, ignore_errors=True)
            out["remote_pull_s"] = timed(dst, sys.executable, "-m", "pcb_aoi.remote", "pull", "--", *jobs, *(["--allow-missing"] if a.partial else []), env=env)
            BlobServiceClient.from_connection_string(conn).delete_container(container)
            BlobServiceClient.from_connection_string(conn).create_container(container)
            out["remote_push_s"] = timed(src, sys.executable, "-m", "pcb_aoi.remote", "push", "--", *jobs, env=env, partial=a.partial)
            out["cpus"] = os.cpu_count()
            print(json.dumps(out))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
