"""A local S3-compatible server for the tests and the benchmarks: moto in server mode, its own process,
over real HTTP on 127.0.0.1, reached through s3fs and Airflow's ObjectStoragePath."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pg_safe_backup.local_cluster import free_port

#: moto accepts any credentials.
KEY = SECRET = "testing"
REGION = "us-east-1"


@dataclass(frozen=True)
class LocalS3:
    """A running server and one bucket in it."""

    endpoint_url: str
    bucket: str

    def filesystem(self) -> Any:
        """An s3fs filesystem of the server (no instance cache: each is its own)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=KEY,
            secret=SECRET,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
        )

    def environment(self) -> dict[str, str]:
        """The server's credentials and endpoint as the AWS tools (and s3fs, and the CLI) read them."""
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def attach(self, conn_id: str) -> Any:
        """Attach the server to Airflow's object storage as ``s3://<conn_id>@``; the bucket's path.

        ObjectStoragePath hands the attached, configured filesystem to every operation only for a path
        that names a connection.

        :param conn_id: the connection id the paths name.
        """
        from airflow.sdk import ObjectStoragePath
        from airflow.sdk.io import attach

        attach("s3", conn_id=conn_id, fs=self.filesystem())
        return ObjectStoragePath(f"s3://{conn_id}@{self.bucket}")


@contextmanager
def local_s3(bucket: str, start_timeout: float = 30) -> Iterator[LocalS3]:
    """A moto S3 server on a free port of 127.0.0.1 with ``bucket`` made; stopped on exit (its objects,
    kept in its memory, go with it).

    :param bucket: the bucket to make.
    :param start_timeout: seconds to wait for it to listen.
    """
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        s3 = LocalS3(f"http://127.0.0.1:{port}", bucket)
        s3.filesystem().call_s3("create_bucket", Bucket=bucket)
        yield s3
    finally:
        server.terminate()
        server.wait(timeout=30)
