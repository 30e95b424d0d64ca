"""Where shard bytes come from: local files, or an S3-compatible object store read by byte ranges.

The shard datasets ask a source for a shard's size and for byte ranges (an index, a member with its tar header), so
the same map-style datasets, with the same exact-resume sampler and per-rank split, read shards from a disk or from
a bucket. `ObjectStore` talks to the endpoint the config or the standard AWS settings name, through botocore (the
AWS SDK's core; `pip install 'selfflow[stream]'`): one ranged GET per sample, retried by botocore, with credentials
from the usual chain (environment, profile, config files) and never from the instance-metadata service unless
`instance_credentials=true`, so nothing but the configured endpoint is ever contacted.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from selfflow.data.deadline import request_deadline, within_deadline

T = TypeVar("T")
R = TypeVar("R")
URL_SCHEME = "s3://"
STALLED_HINT = (
    "the endpoint stalls or answers very slowly; check data.dataset.store.endpoint_url and the "
    "network (data.dataset.store.timeout_s bounds every request)"
)
ADDRESSING_STYLES = ("auto", "path", "virtual")


class ByteSource(Protocol):
    """Sizes and byte ranges of shards (and the small files beside them)."""

    def size(self, location) -> int: ...

    def read(self, location, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer at the end); FileNotFoundError if `location` does not exist."""

    def glob(self, folder, pattern: str) -> list:
        """The files directly in `folder` whose names match the glob `pattern`, sorted."""

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[function(item) for item in items]`, concurrently where that helps (network requests)."""


def is_url(location) -> bool:
    return isinstance(location, str) and location.startswith(URL_SCHEME)


class LocalFiles:
    """Shards on a file system."""

    def size(self, location: str | os.PathLike) -> int:
        return os.stat(location).st_size

    def read(self, location: str | os.PathLike, offset: int, size: int) -> bytes:
        with open(location, "rb") as f:
            size = max(0, min(size, os.fstat(f.fileno()).st_size - offset))  # never allocate past the end
            f.seek(offset)
            return f.read(size)

    def glob(self, folder: str | os.PathLike, pattern: str) -> list[Path]:
        return sorted(p for p in Path(folder).glob(pattern) if p.is_file())

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [function(item) for item in items]


class ObjectStoreError(ValueError):
    """The store cannot be read (unreachable, no credentials, access refused): a setting the user fixes, so the
    CLIs print it as one line. Never taken for a bad sample: a run stops rather than skip every sample."""


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b.tar` -> ("bucket", "a/b.tar")."""
    bucket, _, key = url[len(URL_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket; write s3://BUCKET/PATH")
    return bucket, key


class ObjectStore:
    """Shards in an S3-compatible object store (AWS S3, MinIO, Ceph, R2, ...), read by ranged GETs.

    endpoint_url: e.g. http://127.0.0.1:9000 for a local MinIO; None: botocore's own resolution
    (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's config, else AWS S3). region, profile:
    None means botocore's resolution (AWS_REGION, AWS_PROFILE, ~/.aws/config; us-east-1 when nothing
    is set). Credentials are never configured here: botocore reads them from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, the profile or the credentials file; instance_credentials=true also asks
    the instance-metadata service (on a cloud VM with a role). addressing_style: path for most
    self-hosted stores. max_connections: parallel requests at start-up (indexes) and the connection
    pool; retries: attempts per request (botocore's standard retry mode); timeout_s: per connection
    and read, and the deadline of a whole request (`deadline.py`: plus the time its body takes at 1
    MiB/s), so an endpoint that trickles its answer stops the run with one line instead of stalling
    it.

    A client is made lazily in each process (DataLoader workers get their own: a client must not cross a fork).
    """

    def __init__(
        self,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: str = "auto",
        instance_credentials: bool = False,
        max_connections: int = 16,
        retries: int = 5,
        timeout_s: float = 60.0,
    ):
        if addressing_style not in ADDRESSING_STYLES:
            raise ValueError(
                f"data.dataset.store.addressing_style={addressing_style!r} is unknown; choose one of "
                f"{ADDRESSING_STYLES}"
            )
        if max_connections < 1 or retries < 1 or timeout_s <= 0:
            raise ValueError(
                f"data.dataset.store.max_connections={max_connections}, retries={retries} and "
                f"timeout_s={timeout_s} must be positive"
            )
        self.endpoint_url, self.region, self.profile = endpoint_url, region, profile
        self.addressing_style, self.instance_credentials = addressing_style, instance_credentials
        self.max_connections, self.retries, self.timeout_s = max_connections, retries, timeout_s
        self._client = self._threads = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_threads": None, "_pid": None}

    def _this_process(self) -> None:
        """Forget the client and threads of the process this one was forked from."""
        if self._pid != os.getpid():
            self._client = self._threads = None
            self._pid = os.getpid()

    def where(self) -> str:
        return self.endpoint_url or "the endpoint of the AWS settings (AWS_ENDPOINT_URL or AWS S3)"

    def client(self):
        self._this_process()
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self):
        try:
            import botocore.session
            from botocore.config import Config
        except ImportError:
            raise ModuleNotFoundError(
                "reading shards from s3:// needs botocore: pip install 'selfflow[stream]'"
            ) from None
        session = botocore.session.Session(profile=self.profile)
        if not self.instance_credentials:  # no request to the instance-metadata address, ever
            session.get_component("credential_provider").remove("iam-role")
        config = Config(
            s3={"addressing_style": self.addressing_style},
            max_pool_connections=self.max_connections,
            retries={"max_attempts": self.retries, "mode": "standard"},
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
        )
        region = self.region or session.get_config_variable("region") or "us-east-1"
        return session.create_client("s3", endpoint_url=self.endpoint_url, region_name=region, config=config)

    def _call(self, operation: str, url: str, **arguments):
        """One request; its errors as FileNotFoundError (missing), ObjectStoreError (anything else), or None for a
        range that starts past the end of the object."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        bucket = split_url(url)[0]
        client = self.client()
        try:
            return within_deadline(
                lambda opened: getattr(client, operation)(Bucket=bucket, **arguments),
                request_deadline(self.timeout_s),
                f"{operation} {url}",
            )
        except TimeoutError as error:
            raise ObjectStoreError(f"{error} at {self.where()}; {STALLED_HINT}") from None
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{url} does not exist at {self.where()}") from None
            if code == "NoSuchBucket":
                raise FileNotFoundError(f"bucket {bucket} does not exist at {self.where()} ({url})") from None
            if code == "InvalidRange":
                return None
            raise ObjectStoreError(
                f"{url}: {code or 'error'} from {self.where()} ({str(error)[:200]}); check the "
                f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and "
                f"data.dataset.store"
            ) from None
        except NoCredentialsError:
            raise ObjectStoreError(
                f"no credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or AWS_PROFILE (data.dataset.store.profile); on a cloud VM with a role, "
                f"data.dataset.store.instance_credentials=true"
            ) from None
        except BotoCoreError as error:
            raise ObjectStoreError(
                f"cannot read {url} from {self.where()} ({str(error)[:200]}); check "
                f"data.dataset.store.endpoint_url (or AWS_ENDPOINT_URL) and the network"
            ) from None

    def size(self, location: str) -> int:
        return int(self._call("head_object", location, Key=split_url(location)[1])["ContentLength"])

    def read(self, location: str, offset: int, size: int) -> bytes:
        """One ranged GET; a connection that breaks while the body streams is retried like a failed request."""
        from botocore.exceptions import BotoCoreError

        if size <= 0:
            return b""
        attempt = 1
        while True:
            response = self._call(
                "get_object", location, Key=split_url(location)[1], Range=f"bytes={offset}-{offset + size - 1}"
            )
            if response is None:  # the range starts past the end
                return b""
            length = min(size, int(response.get("ContentLength", size)))  # allocate what was asked for at most
            try:
                seconds = request_deadline(self.timeout_s, length)
                return read_body(response["Body"], length, seconds, location)
            except (BotoCoreError, OSError) as error:  # a TimeoutError of the deadline too
                if attempt >= self.retries:
                    raise ObjectStoreError(
                        f"reading {location} from {self.where()} broke off {attempt} times "
                        f"({str(error)[:200]}); check the network"
                    ) from None
                attempt += 1

    def glob(self, folder: str, pattern: str) -> list[str]:
        """The objects directly in `folder` whose names match the glob `pattern`, sorted."""
        bucket, prefix = split_url(folder.rstrip("/") + "/")
        found, token = [], None
        while True:
            page = self._call(
                "list_objects_v2",
                folder,
                Prefix=prefix,
                Delimiter="/",
                **({"ContinuationToken": token} if token else {}),
            )
            found += [
                item["Key"]
                for item in page.get("Contents", [])
                if fnmatch.fnmatchcase(item["Key"][len(prefix) :], pattern)
            ]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(f"{URL_SCHEME}{bucket}/{key}" for key in found)

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`function` over `items` on max_connections threads (requests wait on the network, not the CPU)."""
        self._this_process()
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.max_connections, thread_name_prefix="selfflow-store")
        return list(self._threads.map(function, items))


def read_body(body, length: int, seconds: float, location: str) -> bytes:
    """Up to `length` bytes of a response `body` (file-like with read and close), within `seconds`
    in all: a body that trickles in is given up (TimeoutError) instead of holding the run."""

    def read(opened: list) -> bytes:
        opened.append(body)
        with body:
            return body.read(length)

    return within_deadline(read, seconds, f"GET {location}")


def source_for(locations: Iterable, store: ObjectStore | None) -> ByteSource:
    """The object store for s3:// locations, local files for paths; one split's shards live in one place."""
    kinds = {is_url(location) for location in locations}
    if kinds == {True, False}:
        raise ValueError("a split's shards must be all local or all in the object store (s3://...), not both")
    if True in kinds:
        return store if store is not None else ObjectStore()
    return LocalFiles()


def parent(location):
    """The folder of a shard: its parent path, or its URL up to the last slash."""
    return location.rsplit("/", 1)[0] if is_url(location) else Path(location).parent


def child(folder, name: str):
    return f"{folder}/{name}" if is_url(folder) else Path(folder) / name
