"""``hcx export --push-to-hub REPO``: upload an exported directory to the Hugging Face Hub
with ``huggingface_hub`` (the token from ``HF_TOKEN`` or ``huggingface-cli login``; the
address from ``HF_ENDPOINT``). Whether the Hub can be reached is checked before the
export starts, so an offline machine is told at once instead of after the conversion."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hcx.errors import HcxError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The probe's patience: a reachable Hub answers in well under this.
TIMEOUT_S = 15.0


class HubError(HcxError, RuntimeError):
    pass


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")  # read now: huggingface_hub read it at import
    if flag is None:
        return bool(constants.HF_HUB_OFFLINE)
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def check_reachable(repo: str) -> None:
    """Refuse, saying why, a push that cannot happen: a malformed repository name, offline
    mode (``HF_HUB_OFFLINE``), or an endpoint that does not answer."""
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    if not REPO_ID.match(repo):
        raise HubError(f"--push-to-hub {repo!r}: a Hub repository is OWNER/NAME")
    if _offline():
        raise HubError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so the Hub is not "
                       "reachable from here; export without --push-to-hub and upload the "
                       "directory from a connected machine (huggingface-cli upload REPO DIR)")
    endpoint = _endpoint()
    try:  # any HTTP answer (404 for a repository to create, 401, ...) will do
        urlopen(Request(f"{endpoint}/api/models/{repo}", method="HEAD"), timeout=TIMEOUT_S).close()
    except HTTPError:
        pass
    except (URLError, OSError) as e:
        raise HubError(f"--push-to-hub {repo}: the Hub at {endpoint} is not reachable "
                       f"({type(e).__name__}: {e}); export without --push-to-hub and upload "
                       "the directory later (huggingface-cli upload REPO DIR)") from None


def push(directory: Path, repo: str, log=print) -> str:
    """Create ``repo`` if needed and upload ``directory`` as one commit; its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    api = HfApi(endpoint=_endpoint())
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(directory), repo_type="model",
                                   commit_message=f"hcx export {Path(directory).name}")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = (" (no or an invalid token: set HF_TOKEN or run huggingface-cli login)"
                if status in (401, 403) else "")
        raise HubError(f"--push-to-hub {repo}: the Hub refused the upload{hint}: {e}; the "
                       f"export is complete at {directory}") from None
    except OSError as e:  # the connection dropped
        raise HubError(f"--push-to-hub {repo}: the upload failed ({e}); the export is "
                       f"complete at {directory}") from None
    return getattr(commit, "commit_url", f"{_endpoint()}/{repo}")
