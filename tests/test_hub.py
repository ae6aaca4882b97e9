"""--push-to-hub: what would be uploaded, with a fake at the hub-client boundary (HfApi) and nothing else faked."""

from __future__ import annotations

import shutil

import pytest
from _fixtures_eval import trained_run  # noqa: F401  (fixture)
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from phitune.after.generate import resolve_model_source
from phitune.after.hub import push_folder
from phitune.after.merge import merge_adapter
from phitune.errors import PhituneError

TOKEN = "hf_phitune_test_secret_token"


@pytest.fixture
def fake_hub(monkeypatch):
    """Record create_repo and the files upload_folder would send (its own ignore_patterns applied)."""
    calls = {}
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, *, folder_path, repo_id, ignore_patterns=None, **kwargs):
        from pathlib import Path

        root = Path(folder_path)
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        calls["repo_id"] = repo_id
        kept = filter_repo_objects(files, ignore_patterns=ignore_patterns)
        calls["files"] = {f: (root / f).read_bytes() for f in kept}
        return "https://huggingface.co/fake/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_merge_pushes_the_merged_model(trained_run, tmp_path, fake_hub):  # noqa: F811
    result = merge_adapter(*resolve_model_source(trained_run), tmp_path / "merged", push_to_hub="me/tiny-merged")
    assert result.hub_url.endswith("/commit/1")
    assert fake_hub["create_repo"]["repo_id"] == "me/tiny-merged" and fake_hub["create_repo"]["private"] is True
    names = set(fake_hub["files"])
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    assert all(TOKEN.encode() not in data for data in fake_hub["files"].values())


def test_run_push_skips_checkpoints_and_holds_no_token(trained_run, tmp_path, fake_hub):  # noqa: F811
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "checkpoint-5").mkdir()
    (run / "checkpoint-5" / "optimizer.pt").write_bytes(b"big")
    push_folder(run, "me/tiny-adapter")
    names = set(fake_hub["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "phitune_config.yaml"} <= names
    assert not any(n.startswith("checkpoint-") for n in names)
    assert all(TOKEN.encode() not in data for data in fake_hub["files"].values())


def test_hub_failure_is_one_actionable_line(tmp_path, monkeypatch):
    def refuse(self, repo_id, **kwargs):
        raise RuntimeError("401 Unauthorized\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(PhituneError, match=r"push to hub repo 'me/x' failed: .*401 Unauthorized") as caught:
        push_folder(tmp_path, "me/x")
    assert "\n" not in str(caught.value) and "more detail" not in str(caught.value)


def test_an_unreachable_hub_is_said_so_and_the_run_is_said_to_be_saved(tmp_path):
    """`phitune train ... --push-to-hub` offline trained, saved, then ended with only 'push to hub repo 'me/tiny'
    failed: [Errno -2] Name or service not known' (issue 35's stranger pass). A real process with a hub address that
    does not resolve: huggingface_hub's own client fails as it does offline."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom phitune.after.hub import push_folder\nfrom phitune.errors import PhituneError\n"
            "try:\n    push_folder(sys.argv[1], 'me/x')\nexcept PhituneError as exc:\n    print(exc)\n")
    env = {**os.environ, "HF_ENDPOINT": "http://hub.invalid", "HF_TOKEN": "hf_x"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          check=False, timeout=120)
    said = done.stdout.strip()
    assert said.startswith("push to hub repo 'me/x' failed (the Hugging Face Hub cannot be reached): "), done
    assert said.endswith(f"{tmp_path} is written and complete here, only the upload did not happen")
