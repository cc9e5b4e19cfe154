"""A StatsD server for the metrics tests: a UDP socket on 127.0.0.1 and the datagrams Airflow sends it."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from pg_safe_backup.utils import metrics

#: The ``[metrics] statsd_prefix`` the tests give Airflow.
PREFIX = "pgsbtest"


@dataclass(frozen=True)
class Datagram:
    """One StatsD line as Airflow sends it with ``statsd_influxdb_enabled`` (tags after the name)."""

    name: str
    value: float
    kind: str  # c (counter), ms (timing)
    tags: dict[str, str]

    @classmethod
    def parse(cls, line: str) -> Datagram:
        stat, _, rest = line.partition(":")
        name, *tags = stat.split(",")
        value, kind = rest.split("|")[:2]
        return cls(name, float(value), kind, dict(tag.split("=", 1) for tag in tags))


class StatsD:
    """A StatsD server: a UDP socket on 127.0.0.1 whose every datagram a thread keeps as it comes (a socket
    read only now and then drops what its buffer cannot hold: Airflow's scheduler alone sends dozens a
    second). ``close()`` ends it.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)  # the reader's look at whether it was closed
        self.received: list[Datagram] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="statsd", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.received += [Datagram.parse(line) for line in data.decode().splitlines()]

    def close(self) -> None:
        self._closed.set()
        self._reader.join(10)
        self.sock.close()

    def named(self, name: str) -> list[Datagram]:
        """The datagrams of ``pg_safe_backup.<name>`` received so far."""
        return [d for d in list(self.received) if d.name == f"{PREFIX}.{metrics.PREFIX}{name}"]

    def arrived(self, name: str, timeout: float = 10) -> list[Datagram]:
        """The datagrams of ``name``, once at least one arrived."""
        deadline = time.monotonic() + timeout
        while not (found := self.named(name)):
            assert time.monotonic() < deadline, f"no {name} in {timeout} s: {self.received[-20:]}"
            time.sleep(0.05)
        return found

    def one(self, name: str, timeout: float = 10) -> Datagram:
        """The one datagram of ``name``, once it arrived."""
        found = self.arrived(name, timeout)
        assert len(found) == 1, found
        return found[0]

    def environment(self) -> dict[str, str]:
        """What points Airflow's StatsD here (tags as InfluxDB's, after the name)."""
        settings = {
            "STATSD_ON": "True",
            "STATSD_HOST": "127.0.0.1",
            "STATSD_PORT": str(self.port),
            "STATSD_PREFIX": PREFIX,
            "STATSD_INFLUXDB_ENABLED": "True",
        }
        return {f"AIRFLOW__METRICS__{key}": value for key, value in settings.items()}
