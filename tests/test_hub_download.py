"""The download path: a published repository, loaded by repo id through the real Hub client in a fresh process
that cannot import dslm_hf, so only the repository's own code (trust_remote_code) can build the model.

No network here, so the repository is served from a pre-filled Hugging Face cache with the Hub's real on-disk
layout (HF_HUB_OFFLINE=1): `models--org--name/blobs/<etag>`, `snapshots/<commit>/<file>` symlinks to the blobs,
`refs/main`. The two commits are real git commits of two staged repositories with different weights, so a pinned
revision is a real commit hash. (olah, a Hub mirror that serves git repositories, was tried first: in offline
mode it answers a probe for a file the repository does not have with 401 "repository not found" unless the
revision is a full commit hash, and transformers probes adapter_config.json first, so loading "org/name" fails.)
"""

import hashlib
import json
import os
import subprocess
import textwrap

import pytest
import torch
from huggingface_hub import scan_cache_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dslm_hf.publishing import stage_repository
from fresh_process import run_without_dslm_hf
from publish_support import build_tiny_checkpoint, write_text_sample, write_tiny_eval_file

REPO_ID = "dslm-test/tiny-decoder"
PROMPT = "ROMEO: I will go"

# Loads the repository by id (optionally at a revision) and saves its logits for PROMPT.
LOAD_FROM_HUB = textwrap.dedent("""
    import json

    try:
        import dslm_hf
        package_importable = True
    except ImportError:
        package_importable = False

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo_id, revision, prompt, output = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, trust_remote_code=True).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
    save_file({"input_ids": input_ids.contiguous(), "logits": logits.contiguous()}, output)
    print(json.dumps({"package_importable": package_importable, "model_module": type(model).__module__,
                      "dslm_modules": sorted(m for m in sys.modules if m.split(".")[0] == "dslm_hf")}))
""")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True).stdout


def commit_folder(repo, folder, message):
    """Replace the git repository's tree by `folder`'s files and commit; return the commit hash."""
    for path in repo.iterdir():
        if path.name != ".git":
            path.unlink()
    for path in folder.iterdir():
        (repo / path.name).write_bytes(path.read_bytes())
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=dslm", "-c", "user.email=dslm@example.com", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").decode().strip()


def fill_hub_cache(cache_dir, repo_id, repo, commits, main):
    """Lay out `commits` of the git repository as the Hub client's cache does after downloading them."""
    root = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(main)
    for commit in commits:
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for line in git(repo, "ls-tree", "-r", commit).decode().splitlines():
            git_blob, path = line.split()[2], line.split("\t", 1)[1]
            content = git(repo, "cat-file", "blob", git_blob)
            # The Hub's etag: the sha256 of an LFS file (weights), the git blob hash of a regular file.
            etag = hashlib.sha256(content).hexdigest() if path.endswith(".safetensors") else git_blob
            (root / "blobs" / etag).write_bytes(content)
            (snapshot / path).symlink_to(os.path.join("..", "..", "blobs", etag))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two published versions of one repository (different weights) in a Hub cache; main is the second."""
    root = tmp_path_factory.mktemp("hub")
    text_file = write_text_sample(root / "sample.txt")
    repo = root / "git-repo"
    repo.mkdir()
    git(repo, "init", "-q")
    staged, commits = [], []
    for version in (1, 2):
        checkpoint = build_tiny_checkpoint(root / f"checkpoint-v{version}", text_file, seed=version)
        eval_file = write_tiny_eval_file(checkpoint, text_file)
        staged.append(stage_repository(checkpoint, root / f"staged-v{version}", REPO_ID, eval_file))
        commits.append(commit_folder(repo, staged[-1], f"version {version}"))
    cache = root / "hub-cache"
    fill_hub_cache(cache, REPO_ID, repo, commits, main=commits[-1])
    return {"root": root, "cache": cache, "staged": staged, "commits": commits}


def run_in_fresh_process(hub, code, *args, tag):
    """Run `code` offline against the Hub cache, with every dslm_hf import refused; return its stdout."""
    return run_without_dslm_hf(code, *args, cwd=hub["root"],
                               env={"HF_HUB_CACHE": str(hub["cache"]), "HF_HOME": str(hub["root"] / f"home-{tag}")})


def load_in_fresh_process(hub, revision, tag):
    output = hub["root"] / f"logits-{tag}.safetensors"
    stdout = run_in_fresh_process(hub, LOAD_FROM_HUB, REPO_ID, revision or "", PROMPT, str(output), tag=tag)
    return json.loads(stdout.strip().splitlines()[-1]), load_file(output)


def original_logits(staged, input_ids):
    model = AutoModelForCausalLM.from_pretrained(staged).eval()  # dslm_hf's registered classes, in this process
    with torch.no_grad():
        return model(input_ids).logits


def test_cache_layout_is_the_hub_clients_own(hub):
    (repo,) = scan_cache_dir(hub["cache"]).repos
    assert repo.repo_id == REPO_ID and repo.repo_type == "model"
    assert sorted(revision.commit_hash for revision in repo.revisions) == sorted(hub["commits"])
    assert {revision.commit_hash: set(revision.refs) for revision in repo.revisions}[hub["commits"][1]] == {"main"}


def test_repo_id_loads_with_remote_code_in_a_process_without_the_package(hub):
    report, loaded = load_in_fresh_process(hub, revision=None, tag="main")
    assert report["package_importable"] is False and report["dslm_modules"] == []
    assert report["model_module"].startswith("transformers_modules.")
    tokenizer = AutoTokenizer.from_pretrained(hub["staged"][1])
    assert loaded["input_ids"].tolist() == tokenizer(PROMPT, return_tensors="pt").input_ids.tolist()
    torch.testing.assert_close(loaded["logits"], original_logits(hub["staged"][1], loaded["input_ids"]), rtol=0, atol=1e-6)


def test_pinned_revision_loads_that_revisions_weights(hub):
    report, loaded = load_in_fresh_process(hub, revision=hub["commits"][0], tag="pinned")
    assert report["package_importable"] is False
    first = original_logits(hub["staged"][0], loaded["input_ids"])
    second = original_logits(hub["staged"][1], loaded["input_ids"])
    torch.testing.assert_close(loaded["logits"], first, rtol=0, atol=1e-6)
    assert (loaded["logits"] - second).abs().max() > 0.1


def test_the_cards_usage_example_runs_as_written(hub):
    readme = (hub["staged"][1] / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in example
    printed = run_in_fresh_process(hub, "import torch; torch.manual_seed(0)\n" + example, tag="card")
    assert printed.strip().startswith("ROMEO:")
