"""Where shard bytes come from: local files, or any object store fsspec reaches, read by byte
ranges.

The shard datasets ask a source for a shard's size and for byte ranges (an index, a member with its
tar header), so the same map-style datasets, with the same exact-resume sampler and per-rank split,
read shards from a disk or from a store: `s3://` (s3fs), `gs://` (gcsfs), `az://` (adlfs),
`https://` (an HTTP server that answers Range requests), `hf://datasets/...` (the Hugging Face hub),
`memory://` (fsspec's in-process store). `ObjectStore` opens the filesystem of each protocol lazily
in each process, with a deadline on every request (`read_range`). Credentials come only from the
environment or the store's own configuration files (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*, HF_TOKEN, ...): nothing in a selfflow config holds one, so none reaches a
checkpoint, hparams or a run folder, and for s3:// the instance-metadata service is never asked
unless `instance_credentials=true`.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
URL_PATTERN = re.compile(r"^([a-z][a-z0-9+.-]*)://")
ADDRESSING_STYLES = ("auto", "path", "virtual")
GOOGLE = (
    "gcsfs",
    "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
)
AZURE = (
    "adlfs",
    "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN",
)
WEB = ("aiohttp", "the server decides who may read")
# protocol -> (the package that reads it, where its credentials come from)
PROTOCOLS = {
    "s3": (
        "s3fs",
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
        "(data.dataset.store.profile); "
        "on a cloud VM with a role, data.dataset.store.instance_credentials=true",
    ),
    "gs": GOOGLE,
    "gcs": GOOGLE,
    "az": AZURE,
    "abfs": AZURE,
    "http": WEB,
    "https": WEB,
    "hf": ("huggingface_hub", "set HF_TOKEN or run `hf auth login`"),
    "memory": ("fsspec", "none are needed"),
}


class ByteSource(Protocol):
    """Sizes and byte ranges of shards (and the small files beside them)."""

    def size(self, location) -> int: ...

    def read(self, location, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (fewer at the end); FileNotFoundError if `location` does
        not exist."""

    def glob(self, folder, pattern: str) -> list:
        """The files directly in `folder` whose names match the glob `pattern`, sorted."""

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[function(item) for item in items]`, concurrently where that helps
        (network requests)."""


def protocol_of(location) -> str | None:
    """`s3://bucket/a.tar` -> "s3"; None for a local path."""
    match = URL_PATTERN.match(location) if isinstance(location, str) else None
    return match.group(1) if match else None


def is_url(location) -> bool:
    return protocol_of(location) is not None


class LocalFiles:
    """Shards on a file system."""

    def size(self, location: str | os.PathLike) -> int:
        return os.stat(location).st_size

    def read(self, location: str | os.PathLike, offset: int, size: int) -> bytes:
        with open(location, "rb") as f:
            size = max(
                0, min(size, os.fstat(f.fileno()).st_size - offset)
            )  # never allocate past the end
            f.seek(offset)
            return f.read(size)

    def glob(self, folder: str | os.PathLike, pattern: str) -> list[Path]:
        return sorted(p for p in Path(folder).glob(pattern) if p.is_file())

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        return [function(item) for item in items]


class ObjectStoreError(ValueError):
    """The store cannot be read (unreachable, no credentials, access refused, too slow): a setting
    the user fixes, so the CLIs print it as one line. Never taken for a bad sample: a run stops
    rather than skip every sample."""


NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")


class RequestDeadline(TimeoutError):
    """A request to a store took longer than its deadline in all."""


def _in_thread(call: Callable[[], R], deadline_s: float) -> R:
    """`call()` on a helper thread, given up after `deadline_s` seconds (for filesystems without an
    event loop)."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    worker = threading.Thread(target=run, name="store_request", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        raise RequestDeadline(f"no answer within {deadline_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def within_deadline(fs, method: str, deadline_s: float, *args, **kwargs):
    """`fs.<method>(*args, **kwargs)`, the whole request (connect, send, receive every byte)
    cancelled after `deadline_s` seconds: on the filesystem's event loop for async ones (s3fs,
    gcsfs, adlfs, HTTP), else on a helper thread.

    Raises:
        RequestDeadline: the request took longer.
    """
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import FSTimeoutError, sync

        try:
            return sync(fs.loop, getattr(fs, f"_{method}"), *args, timeout=deadline_s, **kwargs)
        except FSTimeoutError:
            raise RequestDeadline(f"no answer within {deadline_s:g} s") from None
    return _in_thread(lambda: getattr(fs, method)(*args, **kwargs), deadline_s)


def read_range(fs, url: str, start: int, end: int, deadline_s: float) -> bytes:
    """Bytes [start, end) of the object at `url` (fewer at its end), all of them within `deadline_s`
    seconds.

    Args:
        fs: an fsspec filesystem that reads `url`.
        url: the object.
        start, end: the byte range, end exclusive.
        deadline_s: the most seconds the request may take in all.

    Returns:
        At most `end - start` bytes; b"" for a range that starts past the end.
    """
    if end <= start:
        return b""
    try:
        data = within_deadline(fs, "cat_file", deadline_s, url, start=start, end=end)
    except OSError as error:
        past_the_end = error.errno == errno.EINVAL  # S3's InvalidRange
        if past_the_end and not isinstance(error, FileNotFoundError):
            return b""
        raise
    if len(data) > end - start:
        raise ObjectStoreError(
            f"{url}: the server sent {len(data)} bytes for a range of {end - start}: it "
            f"ignores Range requests; serve the shards from a server that answers them "
            f"(object stores and most web servers do)"
        )
    return data


class ObjectStore:
    """Shards in an object store that fsspec reaches (see the module docstring), read by ranged
    requests.

    The S3 settings (for s3://, through s3fs): endpoint_url, e.g. http://127.0.0.1:9000 for a local
        MinIO (None:
    AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, the profile's config, else AWS S3); region, profile
    (None: AWS_REGION, AWS_PROFILE, ~/.aws/config; us-east-1 when nothing is set); addressing_style
    (path for most self-hosted stores); instance_credentials (true also asks a cloud VM's
    instance-metadata service). Other protocols take their settings from their own environment
    variables and configuration files.

    For every protocol: max_connections: parallel requests at start-up (indexes) and the connection
        pool; retries:
    attempts per request; timeout_s: the most seconds one request may take in all, connecting and
    receiving.

    A filesystem is made lazily in each process (DataLoader workers get their own: one must not
    cross a fork).
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
                f"data.dataset.store.addressing_style={addressing_style!r} is unknown; choose one "
                f"of {ADDRESSING_STYLES}"
            )
        if max_connections < 1 or retries < 1 or timeout_s <= 0:
            raise ValueError(
                f"data.dataset.store.max_connections={max_connections}, retries={retries} and "
                f"timeout_s={timeout_s} must be positive"
            )
        self.endpoint_url, self.region, self.profile = endpoint_url, region, profile
        self.addressing_style, self.instance_credentials = addressing_style, instance_credentials
        self.max_connections, self.retries, self.timeout_s = max_connections, retries, timeout_s
        self._filesystems: dict = {}
        self._threads = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_filesystems": {}, "_threads": None, "_pid": None}

    def _this_process(self) -> None:
        """Forget the filesystems and threads of the process this one was forked from."""
        if self._pid != os.getpid():
            self._filesystems, self._threads = {}, None
            self._pid = os.getpid()

    def where(self, url: str) -> str:
        if protocol_of(url) == "s3":
            default = "the endpoint of the AWS settings (AWS_ENDPOINT_URL or AWS S3)"
            return self.endpoint_url or default
        return f"{protocol_of(url)}://"

    def filesystem(self, url: str):
        """The fsspec filesystem that reads `url`, made once per protocol and process."""
        self._this_process()
        protocol = protocol_of(url)
        if protocol not in self._filesystems:
            self._filesystems[protocol] = self._new_filesystem(protocol, url)
        return self._filesystems[protocol]

    def _new_filesystem(self, protocol: str, url: str):
        try:
            import fsspec
        except ImportError:
            raise ModuleNotFoundError(
                f"reading shards from {url} needs fsspec: pip install 'selfflow[stream]'"
            ) from None
        package = PROTOCOLS.get(protocol, ("",))[0]
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except ImportError:
            raise ModuleNotFoundError(
                f"reading shards from {protocol}:// ({url}) needs {package}: pip install {package}"
            ) from None
        except ValueError:
            raise ValueError(
                f"{url}: no filesystem reads {protocol}://; check data.root (s3://, gs://, "
                f"az://, https://, hf://datasets/..., memory:// or a local path)"
            ) from None
        options = STORE_OPTIONS.get(protocol, lambda store: {})(self)
        return cls(skip_instance_cache=True, **options)

    def _call(self, method: str, url: str, *args, **kwargs):
        """One request, given up after timeout_s and tried `retries` times; errors as
        FileNotFoundError (missing) or ObjectStoreError (anything the user fixes: credentials,
        endpoint, network)."""
        fs = self.filesystem(url)
        for attempt in range(1, self.retries + 1):
            try:
                return method(fs, url, *args, **kwargs)
            except FileNotFoundError:
                raise FileNotFoundError(f"{url} does not exist at {self.where(url)}") from None
            except ObjectStoreError:
                raise
            except RequestDeadline:
                if attempt < self.retries:
                    continue
                raise ObjectStoreError(
                    f"reading {url} from {self.where(url)} took longer than "
                    f"data.dataset.store.timeout_s={self.timeout_s:g} s, {attempt} times; check "
                    f"the network or raise the timeout"
                ) from None
            except Exception as error:
                raise self._explained(url, error) from None
        raise AssertionError("unreachable")

    def _explained(self, url: str, error: Exception) -> ObjectStoreError:
        """The one-line error a user acts on, naming the setting; never the credentials
        themselves."""
        hint = PROTOCOLS.get(protocol_of(url), ("", "check the store's settings"))[1]
        if type(error).__name__ in NO_CREDENTIALS:
            return ObjectStoreError(f"no credentials to read {url}: {hint}")
        if isinstance(error, PermissionError):
            refused = f"access refused by {self.where(url)} ({str(error)[:200]})"
            return ObjectStoreError(f"{url}: {refused}; {hint}")
        endpoint = "data.root"
        if protocol_of(url) == "s3":
            endpoint = "data.dataset.store.endpoint_url (or AWS_ENDPOINT_URL)"
        return ObjectStoreError(
            f"cannot read {url} from {self.where(url)} ({type(error).__name__}: "
            f"{str(error)[:200]}); check {endpoint} and the network"
        )

    def size(self, location: str) -> int:
        def size(fs, url):
            return within_deadline(fs, "size", self.timeout_s, url)

        return int(self._call(size, location))

    def read(self, location: str, offset: int, size: int) -> bytes:
        """One ranged request for bytes [offset, offset + size) (fewer at the end)."""

        def ranged(fs, url):
            return read_range(fs, url, offset, offset + size, self.timeout_s)

        return self._call(ranged, location)

    def glob(self, folder: str, pattern: str) -> list[str]:
        """The objects directly in `folder` whose names match the glob `pattern`, sorted (as
        `folder/NAME`)."""
        folder = folder.rstrip("/")

        def listing(fs, url):
            return within_deadline(fs, "ls", self.timeout_s, url, detail=True)

        try:
            entries = self._call(listing, folder)
        except FileNotFoundError:
            return []
        files = [entry["name"].rstrip("/") for entry in entries if entry.get("type") == "file"]
        names = {name.rsplit("/", 1)[-1] for name in files}
        return sorted(f"{folder}/{name}" for name in names if fnmatch.fnmatchcase(name, pattern))

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`function` over `items` on max_connections threads (requests wait on the network, not
        the CPU)."""
        self._this_process()
        if self._threads is None:
            self._threads = ThreadPoolExecutor(
                self.max_connections,
                thread_name_prefix="selfflow-store",
            )
        return list(self._threads.map(function, items))


def s3_options(store: ObjectStore) -> dict:
    """s3fs's arguments: botocore's retries, pool and timeouts; a session without the
    instance-metadata provider unless allowed. Credentials stay with the session's own chain
    (environment, profile, config files)."""
    from aiobotocore.session import AioSession

    session = AioSession(profile=store.profile)
    if not store.instance_credentials:  # no request to the instance-metadata address, ever
        session.get_component("credential_provider").remove("iam-role")
    region = store.region or session.get_config_variable("region") or "us-east-1"
    config = {
        "s3": {"addressing_style": store.addressing_style},
        "max_pool_connections": store.max_connections,
        "retries": {"max_attempts": store.retries, "mode": "standard"},
        "connect_timeout": store.timeout_s,
        "read_timeout": store.timeout_s,
    }
    client = {"region_name": region}
    return {
        "session": session,
        "endpoint_url": store.endpoint_url,
        "client_kwargs": client,
        "config_kwargs": config,
        "retries": store.retries,
    }


def http_options(store: ObjectStore) -> dict:
    """aiohttp's timeouts per request (the deadline in `read_range` bounds the whole)."""
    import aiohttp

    seconds = store.timeout_s
    timeout = aiohttp.ClientTimeout(total=seconds, sock_connect=seconds, sock_read=seconds)
    return {"client_kwargs": {"timeout": timeout}}


# protocol -> the filesystem's arguments from the store's settings (others: their own configuration)
STORE_OPTIONS: dict[str, Callable[[ObjectStore], dict]] = {
    "s3": s3_options,
    "http": http_options,
    "https": http_options,
}


def source_for(locations: Iterable, store: ObjectStore | None) -> ByteSource:
    """The object store for URLs, local files for paths; one split's shards live in one place."""
    kinds = {is_url(location) for location in locations}
    if kinds == {True, False}:
        raise ValueError(
            "a split's shards must be all local or all in an object store (s3://, ...), not both",
        )
    if True in kinds:
        return store if store is not None else ObjectStore()
    return LocalFiles()


def parent(location):
    """The folder of a shard: its parent path, or its URL up to the last slash."""
    return location.rsplit("/", 1)[0] if is_url(location) else Path(location).parent


def child(folder, name: str):
    return f"{folder}/{name}" if is_url(folder) else Path(folder) / name
