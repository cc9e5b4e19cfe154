"""Counts a bench stack's triggerers' execution-API calls (figure 11, bench/fleetbench.py).

Python imports this module at start-up in every process whose PYTHONPATH names this folder; it does
something only in a triggerer's process (``PGSB_AIRFLOW_COMPONENT`` ``triggerer...``) with
``BENCH_API_CALLS_DIR`` set. There a trigger's Task SDK call (``get_task_states``, ``get_dagrun_state``,
an XCom, a connection) is a request that the triggerer's supervisor process sends to the execution API
it runs in-process (``http://in-process.invalid./``); each such request is counted by route, and the
counts are written, once a second, to ``BENCH_API_CALLS_DIR/<component>-<pid>.json``. The product code is
untouched.
"""

from __future__ import annotations

import os


def _install() -> None:
    out = os.environ.get("BENCH_API_CALLS_DIR")
    component = os.environ.get("PGSB_AIRFLOW_COMPONENT", "")
    if not out or not component.startswith("triggerer"):
        return
    import collections
    import json
    import threading
    import time

    import httpx

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    send = httpx.Client.send

    def counting_send(self: httpx.Client, request: httpx.Request, *args: object, **kwargs: object) -> object:
        if request.url.host.startswith("in-process"):
            parts = [p for p in request.url.path.split("/") if p]
            route = f"{request.method} /{parts[0]}/../{parts[-1]}" if len(parts) > 1 else request.url.path
            with lock:
                counts[route] += 1
        return send(self, request, *args, **kwargs)  # type: ignore[arg-type]

    httpx.Client.send = counting_send  # type: ignore[method-assign,assignment]
    owner = os.getpid()

    def dump() -> None:
        path = os.path.join(out, f"{component}-{owner}.json")
        while True:
            time.sleep(1)
            if os.getpid() != owner:  # a forked child (the trigger runner) does not count
                return
            with lock:
                data = json.dumps({"at": time.time(), "calls": dict(counts)})
            with open(path + ".tmp", "w") as f:
                f.write(data)
            os.replace(path + ".tmp", path)

    threading.Thread(target=dump, name="bench-api-calls", daemon=True).start()


_install()
