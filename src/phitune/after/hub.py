"""Publishing to the Hugging Face Hub. The token comes from the environment (HF_TOKEN) and is never written down."""

from __future__ import annotations

from pathlib import Path

from phitune.errors import PhituneError, first_line

# Checkpoints hold optimizer state (large, not needed to use the model); they stay local.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "phitune_complete"]


def push_folder(folder: Path, repo_id: str, private: bool = True) -> str:
    """Create `repo_id` if needed and upload `folder` (without checkpoints); return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            ignore_patterns=IGNORE_PATTERNS,
            commit_message="Upload with phitune",
        )
    except Exception as exc:  # network, auth and permission errors all end the same way for the user
        unreachable = " (the Hugging Face Hub cannot be reached)" if _unreachable(exc) else ""
        raise PhituneError(f"push to hub repo {repo_id!r} failed{unreachable}: {first_line(exc)}; {folder} is "
                           "written and complete here, only the upload did not happen") from None
    return str(getattr(commit, "commit_url", commit))


def _unreachable(exc: Exception) -> bool:
    """A connection that failed (no network, a name that does not resolve, a timeout), as huggingface_hub's HTTP
    client (httpx: ConnectError, ConnectTimeout) or the OS raises it; not a refusal by the Hub (401, 403)."""
    names = [cls.__name__ for cls in type(exc).__mro__]
    return isinstance(exc, OSError) or any(n in ("NetworkError", "TimeoutException", "OfflineModeIsEnabled")
                                           for n in names)
