"""FakeHub driven by huggingface_hub's public API only, so the fake stays faithful to what the client sends."""

import os
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import (
    HfApi,
    create_branch,
    create_repo,
    file_exists,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    repo_exists,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.fake_hub import FakeHub, use_fake_hub

TOKEN = "hf_fake_token"
FILES = {
    "adapter_config.json": b'{"peft_type": "LORA"}',
    "adapter_model.safetensors": bytes(range(256)) * 4,
    "other/adapter_config.json": b'{"peft_type": "IA3"}',
    "README.md": b"---\nlibrary_name: peft\n---\n# Adapter\n",  # makes the client call validate-yaml
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf_home")
        yield hub


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "adapter"
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_create_repo_stores_private_flag_and_exist_ok(hub):
    url = create_repo("me/private", private=True, token=TOKEN)
    assert url.repo_id == "me/private" and url.endpoint == hub.url
    assert hub.is_private("me/private")
    assert create_repo("me/private", private=True, token=TOKEN, exist_ok=True).repo_id == "me/private"
    assert create_repo("me/private", token=TOKEN, exist_ok=True).repo_id == "me/private"
    with pytest.raises(HfHubHTTPError) as err:
        create_repo("me/private", token=TOKEN)
    assert err.value.response.status_code == 409
    assert not hub.is_private(create_repo("me/public", token=TOKEN).repo_id)
    assert create_repo("no-namespace", token=TOKEN).repo_id == "fake-user/no-namespace"
    assert list(hub.files("me/public")) == [".gitattributes"]  # "main" starts like on the Hub


def test_upload_folder_then_download_every_file(hub, folder):
    create_repo("me/adapter", token=TOKEN)
    info = upload_folder(repo_id="me/adapter", folder_path=folder, token=TOKEN, commit_message="add adapter")
    head = hub.commits("me/adapter")[-1]
    assert info.oid == head.oid and head.message == "add adapter"
    assert hub.files("me/adapter") == {".gitattributes": hub.files("me/adapter")[".gitattributes"], **FILES}

    for name, data in FILES.items():
        assert read(hf_hub_download("me/adapter", name)) == data
    assert read(hf_hub_download("me/adapter", "adapter_config.json", subfolder="other")) == FILES[
        "other/adapter_config.json"]

    meta = get_hf_file_metadata(hf_hub_url("me/adapter", "adapter_model.safetensors"))
    assert (meta.commit_hash, meta.size) == (head.oid, len(FILES["adapter_model.safetensors"]))
    assert file_exists("me/adapter", "other/adapter_config.json") and not file_exists("me/adapter", "nope.bin")
    api = HfApi()
    assert sorted(api.list_repo_files("me/adapter")) == sorted([".gitattributes", *FILES])
    snapshot = snapshot_download("me/adapter")  # model_info(revision) + tree endpoints
    assert all(read(os.path.join(snapshot, name)) == data for name, data in FILES.items())
    assert api.model_info("me/adapter").sha == head.oid

    # The token went only where it was given: writes carry it, anonymous downloads do not.
    writes = [h for m, p, h in hub.requests if m == "POST"]
    assert ("POST", "/api/validate-yaml") in [(m, p) for m, p, h in hub.requests]
    assert writes and all(h.get("authorization") == f"Bearer {TOKEN}" for h in writes)
    assert all("authorization" not in h for m, p, h in hub.requests if "/resolve/" in p)


def test_branch_upload_and_download_by_branch_and_commit(hub):
    api = HfApi(token=TOKEN)
    create_repo("me/branchy", token=TOKEN)
    v1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="sub/w.txt", repo_id="me/branchy").oid
    create_branch("me/branchy", branch="exp/one", token=TOKEN)
    create_branch("me/branchy", branch="exp/one", token=TOKEN, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        create_branch("me/branchy", branch="exp/one", token=TOKEN)
    assert err.value.response.status_code == 409
    v2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="sub/w.txt", repo_id="me/branchy", revision="exp/one").oid

    assert hub.files("me/branchy")["sub/w.txt"] == b"v1"
    assert hub.files("me/branchy", "exp/one")["sub/w.txt"] == b"v2"
    assert [c.oid for c in hub.commits("me/branchy", "exp/one")][-2:] == [v1, v2]
    for revision, expected in [("exp/one", b"v2"), ("main", b"v1"), (v1, b"v1"), (v2, b"v2")]:
        assert read(hf_hub_download("me/branchy", "sub/w.txt", revision=revision)) == expected
    assert {b.name for b in api.list_repo_refs("me/branchy").branches} == {"main", "exp/one"}


def test_missing_file_repo_and_revision_raise_the_client_errors(hub):
    create_repo("me/repo", token=TOKEN)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("me/repo", "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/absent", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/absent", "config.json", token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("me/repo", ".gitattributes", revision="no-such-branch")
    assert repo_exists("me/repo") and not repo_exists("me/absent")


def test_write_needs_a_valid_token(hub, monkeypatch):
    api = HfApi()
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("me/anon")
    assert err.value.response.status_code == 401
    create_repo("me/repo", token=TOKEN)
    for token in (None, "hf_wrong"):
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="me/repo", token=token)
        assert err.value.response.status_code == 401
    assert len(hub.commits("me/repo")) == 1 and "me/anon" not in hub.repos

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # get_token() reads the env on every call
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="me/repo")
    assert hub.files("me/repo")["x.txt"] == b"x"
    assert hub.requests[-1][2]["authorization"] == f"Bearer {TOKEN}"


def test_failed_commit_changes_nothing_and_a_retry_succeeds(hub, folder):
    create_repo("me/flaky", token=TOKEN)
    before = hub.commits("me/flaky")
    hub.fail_next("commit")  # commits are never retried by the client: one failure is enough
    with pytest.raises(HfHubHTTPError) as err:
        upload_folder(repo_id="me/flaky", folder_path=folder, token=TOKEN)
    assert err.value.response.status_code == 500
    assert hub.commits("me/flaky") == before and list(hub.files("me/flaky")) == [".gitattributes"]

    upload_folder(repo_id="me/flaky", folder_path=folder, token=TOKEN)
    assert len(hub.commits("me/flaky")) == 2 and hub.files("me/flaky")["adapter_config.json"] == FILES[
        "adapter_config.json"]

    hub.fail_next("create_repo", status=503)
    with pytest.raises(HfHubHTTPError):
        create_repo("me/later", token=TOKEN)
    create_repo("me/later", token=TOKEN)
    with pytest.raises(ValueError):
        hub.fail_next("comit")


def test_private_repo_is_hidden_without_token(hub):
    create_repo("me/secret", private=True, token=TOKEN)
    HfApi(token=TOKEN).upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="me/secret")
    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download("me/secret", "s.txt")
    assert err.value.response.status_code == 401
    assert not repo_exists("me/secret") and not file_exists("me/secret", "s.txt")
    assert read(hf_hub_download("me/secret", "s.txt", token=TOKEN)) == b"s"
    assert HfApi(token=TOKEN).model_info("me/secret").private is True


def test_subprocess_pushes_and_pulls_through_env(tmp_path):
    script = textwrap.dedent("""
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        api.create_repo("me/sub", private=True)
        api.upload_file(path_or_fileobj=b"from child", path_in_repo="nested/f.txt", repo_id="me/sub")
        print(open(hf_hub_download("me/sub", "nested/f.txt"), "rb").read().decode())
    """)
    with FakeHub() as hub:
        env = {**os.environ, "HF_TOKEN": "hf_leaked_from_parent", **hub.env(token=TOKEN, home=tmp_path / "home")}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "from child"
        assert hub.is_private("me/sub") and hub.files("me/sub")["nested/f.txt"] == b"from child"
        assert (tmp_path / "home" / "hub" / "models--me--sub").is_dir()
        assert {h.get("authorization") for m, p, h in hub.requests if m == "POST"} == {f"Bearer {TOKEN}"}
