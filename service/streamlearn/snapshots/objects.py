"""Snapshots in an object store (S3 and S3-compatible stores, through fsspec): hosts share them.

Layout under the URL's prefix: <model>/<version>/{weights-<token>.safetensors, meta.json}.
Objects cannot be renamed, so meta.json is the commit point: the weights go first under a
name no other writer uses, then meta.json is created only if absent (S3's If-None-Match: *).
A version without meta.json is not published; if two writers race for a version, exactly one
meta.json wins and the loser deletes its weights and takes the next version. Before all that the
writer claims the version's number, creating <model>/.claimed-<version> only if absent, so no
number is ever published twice, even after its version was deleted. Credentials and
endpoint come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL_S3) or an instance role, never from Streamlearn's own settings.
"""

import time
import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

from streamlearn.errors import SnapshotError, SnapshotStoreUnavailable
from streamlearn.faults import crash_point
from streamlearn.snapshots.store import (
    META,
    SERVING,
    VERSION_DIGITS,
    SnapshotStore,
    claim_name,
    claimed_version,
    stale_claims,
    version_name,
)

STALE_UNPUBLISHED_S = 60  # unpublished weights this old belong to a crashed writer


def _age_s(info: dict[str, Any]) -> float | None:
    """Seconds since an object was written, from whichever field the filesystem reports."""
    stamp = info.get("LastModified", info.get("mtime"))
    if isinstance(stamp, datetime):
        return time.time() - stamp.timestamp()
    if isinstance(stamp, int | float):
        return time.time() - stamp
    return None


class ObjectSnapshotStore(SnapshotStore):
    """A snapshot store at an fsspec URL such as s3://bucket/prefix."""

    def __init__(self, url: str, keep: int = 10) -> None:
        super().__init__(keep)
        self.url = url.rstrip("/")
        try:
            import fsspec  # only object-store deployments need it: the `s3` extra

            # Listings must never come from a cache: the newest version is what we look for.
            self.fs, root = fsspec.core.url_to_fs(
                self.url, use_listings_cache=False, skip_instance_cache=True
            )
        except ImportError as exc:
            hint = " (pip install 'streamlearn[s3]')" if url.startswith("s3://") else ""
            raise SnapshotError(f"snapshot store {url}: {exc}{hint}") from None
        except ValueError as exc:
            raise SnapshotError(f"snapshot store {url}: {exc}") from None
        self.root = root.rstrip("/")

    @property
    def location(self) -> str:
        return self.url

    def _unavailable(self, doing: str, exc: Exception) -> SnapshotStoreUnavailable:
        return SnapshotStoreUnavailable(f"snapshot store {self.url}: {doing} failed: {exc}")

    def ensure_writable(self) -> None:
        probe = f"{self.root}/.write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:  # missing bucket, credentials or endpoint: each its own error type
            raise SnapshotError(f"snapshot store {self.url} is not writable: {exc}") from None

    def models(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise self._unavailable("listing models", exc) from None
        directories = (entry["name"].rstrip("/") for entry in entries if entry["type"] == "directory")
        return sorted(name for name in (path.rsplit("/", 1)[-1] for path in directories) if name[0] != ".")

    def _listing(
        self, model_name: str
    ) -> tuple[dict[int, dict[str, dict[str, Any]]], dict[int, dict[str, Any]]]:
        """Every object of a model in one listing: by version, then by file name; and the claims."""
        prefix = f"{self.root}/{model_name}/"
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}, {}
        except Exception as exc:
            raise self._unavailable(f"listing {model_name}", exc) from None
        by_version: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        claims: dict[int, dict[str, Any]] = {}
        for path, info in found.items():
            version, _, name = path[len(prefix) :].partition("/")
            if len(version) == VERSION_DIGITS and version.isdigit() and name and "/" not in name:
                by_version[int(version)][path.rsplit("/", 1)[-1]] = info
            elif not name and (claimed := claimed_version(version)) is not None:
                claims[claimed] = info
        return by_version, claims

    def _objects(self, model_name: str) -> dict[int, dict[str, dict[str, Any]]]:
        """Every object of a model, by version, then by file name, in one listing."""
        return self._listing(model_name)[0]

    def versions(self, model_name: str) -> list[int]:
        return sorted(version for version, files in self._objects(model_name).items() if META in files)

    def _taken(self, model_name: str) -> int:
        objects, claims = self._listing(model_name)
        published = (version for version, files in objects.items() if META in files)
        return max([*published, *claims, 0])

    def _claim(self, model_name: str, version: int) -> bool:
        try:
            self.fs.pipe_file(f"{self.root}/{model_name}/{claim_name(version)}", b"", mode="create")
        except FileExistsError:
            return False
        except Exception as exc:
            raise self._unavailable(f"claiming {model_name} v{version}", exc) from None
        return True

    def prune(self, model_name: str) -> None:
        objects, claims = self._listing(model_name)
        published = sorted(version for version, files in objects.items() if META in files)
        kept = self.kept(model_name, published)
        doomed = []
        for version, files in objects.items():
            if version in kept:
                continue
            prefix = f"{self.root}/{model_name}/{version_name(version)}"
            for name, info in files.items():
                age = _age_s(info)
                if META in files or (age is not None and age > STALE_UNPUBLISHED_S):
                    doomed.append(f"{prefix}/{name}")
        ages = {version: _age_s(info) for version, info in claims.items()}
        doomed += [f"{self.root}/{model_name}/{claim_name(v)}" for v in stale_claims(ages)]
        if doomed:
            try:
                self.fs.rm(doomed)
            except Exception as exc:
                raise self._unavailable("pruning", exc) from None

    def _weights_name(self) -> str:
        return f"weights-{uuid.uuid4().hex}.safetensors"

    def _publish(self, model_name: str, version: int, files: dict[str, bytes]) -> bool:
        prefix = f"{self.root}/{model_name}/{version_name(version)}"
        payloads = [name for name in files if name != META]
        try:
            for name in payloads:
                self.fs.pipe_file(f"{prefix}/{name}", files[name])
            crash_point("snapshot.before_publish")
            try:
                self.fs.pipe_file(f"{prefix}/{META}", files[META], mode="create")
            except FileExistsError:
                self.fs.rm([f"{prefix}/{name}" for name in payloads])
                return False
        except Exception as exc:
            raise self._unavailable(f"writing {model_name} v{version}", exc) from None
        crash_point("snapshot.after_publish")
        return True

    def _read(self, model_name: str, version: int, name: str) -> bytes:
        path = f"{self.root}/{model_name}/{version_name(version)}/{name}"
        try:
            return bytes(self.fs.cat_file(path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # unreachable, forbidden: not a bad snapshot, so never skip past it
            raise self._unavailable(f"reading {model_name} v{version}", exc) from None

    def _read_serving(self, model_name: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(f"{self.root}/{model_name}/{SERVING}"))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._unavailable(f"reading {SERVING} of {model_name}", exc) from None

    def _write_serving(self, model_name: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(f"{self.root}/{model_name}/{SERVING}", data)  # a PUT replaces it whole
        except Exception as exc:
            raise self._unavailable(f"writing {SERVING} of {model_name}", exc) from None
