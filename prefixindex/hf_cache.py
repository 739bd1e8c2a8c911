"""`--tokenizer` as a local path or a HuggingFace repo id found in the local HF cache, offline.

The hub cache layout (documented by huggingface_hub, "Understand caching"):

    <cache>/models--<org>--<name>/refs/<revision>      holds a commit hash
    <cache>/models--<org>--<name>/snapshots/<commit>/  the files of that commit

`<cache>` is $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub. A repo id may name a revision (`org/name@v1` or `@<commit>`); the default is
`main`. Nothing is downloaded: an absent tokenizer is a one-line FileNotFoundError naming the path
looked for (the CLI prints it and exits 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# `name` or `org/name`, optionally `@revision`: HF's repo-id alphabet.
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+(?:@[\w./-]+)?$")


def hub_cache_dir() -> Path:
    """The HF hub cache directory the environment selects (huggingface_hub's own precedence)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def resolve_tokenizer(spec: str) -> str:
    """A local tokenizer path for `spec`: the path itself when it exists, else the HF cache snapshot."""
    if os.path.exists(spec):
        return spec
    if not _REPO_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file or directory")
    repo, _, revision = spec.partition("@")
    revision = revision or "main"
    repo_dir = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not (snapshot / "tokenizer.json").is_file():
        looked = f"{snapshot}/tokenizer.json" if ref.is_file() else f"{ref} (or snapshots/{revision})"
        raise FileNotFoundError(
            f"tokenizer {spec!r}: not a local path, and not in the HuggingFace cache (looked for {looked};"
            " download it first, e.g. `hf download {repo}`)"
        )
    return str(snapshot)
