"""Uploading a MoGU checkpoint to the Hugging Face Hub."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from mogu.errors import MoGUError, first_line


class HubError(MoGUError):
    """Creating the Hub repository or uploading to it failed."""


def push_to_hub(model_or_dir, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload MoGU model", revision: str | None = None, create_pr: bool = False,
                metrics: str | Path | dict | None = None, license: str | None = None, api=None):
    """Upload a MoGU checkpoint (a folder, or a MoGUModel saved to a temporary one) to the Hub.

    Creates ``repo_id`` if needed (``exist_ok=True``) and uploads the folder in one commit with
    ``HfApi.upload_folder``. ``metrics`` (a ``mogu eval`` metrics.json, its folder or a dict) and
    ``license`` refresh the model card first. ``api`` replaces ``HfApi()`` (tests pass a mock).
    Returns the ``CommitInfo``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    from mogu.version import __version__
    from mogu.tuner.card import refresh_card
    from mogu.tuner.checkpoint import read_config

    try:
        validate_repo_id(repo_id)
    except Exception as e:  # noqa: BLE001 - HFValidationError
        raise HubError(f"invalid repo id {repo_id!r}: {first_line(e)}") from None
    if api is None:
        api = HfApi(token=token, library_name="mogu", library_version=__version__)
    with contextlib.ExitStack() as stack:
        if hasattr(model_or_dir, "save_pretrained"):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mogu-push-")))
            folder = model_or_dir.save_pretrained(tmp / "model")
        else:
            folder = Path(model_or_dir)
            read_config(folder)
        if metrics is not None or license is not None or not (folder / "README.md").is_file():
            refresh_card(folder, metrics=metrics, license=license)
        try:
            url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
            resolved = url.repo_id if isinstance(url, str) and isinstance(getattr(url, "repo_id", None), str) else repo_id
            return api.upload_folder(repo_id=resolved, folder_path=str(folder), commit_message=commit_message,
                                     token=token, repo_type="model", revision=revision, create_pr=create_pr,
                                     ignore_patterns=[".*"])
        except MoGUError:
            raise
        except Exception as e:  # noqa: BLE001 - HfHubHTTPError, network and auth errors
            raise HubError(f"push to {repo_id} failed: {first_line(e)}") from None
