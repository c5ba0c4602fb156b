"""Where GitLab's REST API is for this job or machine: the server, the project and a token, from the
environment (CI_API_V4_URL and CI_PROJECT_ID, as GitLab sets them in a job; GITLAB_TOKEN or
GITLAB_REPORT_TOKEN, never printed). Used through python-gitlab by the sweep's merge requests and the
runner doctor's checks of runner protection and resource groups."""

from __future__ import annotations

import re
from typing import NamedTuple

TOKEN_VARIABLES = ("GITLAB_TOKEN", "GITLAB_REPORT_TOKEN")


class GitLabSettings(NamedTuple):
    url: str  # the server, without /api/v4 (python-gitlab adds it)
    project: str  # numeric id or path
    token: str


def gitlab_settings(env: dict[str, str]) -> GitLabSettings | None:
    """The server, project and token from the environment, or None without a token, API URL or project."""
    token = next((env[name] for name in TOKEN_VARIABLES if env.get(name)), "")
    api, project = env.get("CI_API_V4_URL", ""), env.get("CI_PROJECT_ID", "")
    if not (token and api and project):
        return None
    return GitLabSettings(re.sub(r"/api/v4/?$", "", api), project, token)
