"""Requests to the Backups page in an Airflow API app built as Airflow builds it (``create_app``), run by
tests/test_backups_page.py in a process of its own: Airflow reads its database and auth manager settings
when imported, and the test's process imported it long before with others.

``python tests/page_client.py REQUESTS_JSON`` prints a JSON list: for each request (user, path) its status,
Location header, the ids of the table's rows and the JSON body (an API answer).

The auth manager is Airflow's SimpleAuthManager, whose roles allow every DAG or none;
:class:`OneDagAuthManager` (``[core] auth_manager`` in the test) also lets the users named in
``$PGSB_PAGE_ONE_DAG`` (``user:dag_id``) read that one DAG only, as a per-DAG auth manager (FAB's) would.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

#: The table rows' anchors (pg_safe_backup.backups_page.render_page).
ROW_ID = re.compile(r'<tr id="([^"]*)"')


class OneDagAuthManager(SimpleAuthManager):
    """SimpleAuthManager, with the users of ``$PGSB_PAGE_ONE_DAG`` kept to one DAG each."""

    def is_authorized_dag(
        self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None
    ) -> bool:
        only = dict(pair.split(":", 1) for pair in os.environ.get("PGSB_PAGE_ONE_DAG", "").split(",") if pair)
        if user.username in only and details is not None and details.id is not None:
            return details.id == only[user.username]
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )


def main(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    app = create_app()
    client = TestClient(app)
    answers = []
    for req in requests:
        headers = {}
        if req.get("user"):
            user = SimpleAuthManagerUser(username=req["user"], role=req["role"])
            headers["Authorization"] = f"Bearer {get_auth_manager().generate_jwt(user)}"
        got = client.get(req["path"], headers=headers, follow_redirects=False)
        body = got.json() if got.headers.get("content-type", "").startswith("application/json") else None
        answers.append(
            {
                "status": got.status_code,
                "location": got.headers.get("location"),
                "rows": ROW_ID.findall(got.text),
                "paths": got.text.count('<path d="'),
                "text": got.text if body is None else None,
                "json": body,
            }
        )
    return answers


if __name__ == "__main__":
    print("PAGE-CLIENT " + json.dumps(main(json.loads(sys.argv[1]))))
