"""Hugging Face hub ids (`owner/name`), resolved in the local cache only: nothing is downloaded.

The cache layout (as huggingface_hub writes it):

    CACHE/models--OWNER--NAME/refs/REVISION        a file holding the commit a branch or tag points to
    CACHE/models--OWNER--NAME/snapshots/COMMIT/    that commit's files (symlinks into ../../blobs/)

CACHE is $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
~/.cache/huggingface/hub. A revision is a branch or tag name with a file under refs/, or a commit
hash (full, or a unique prefix of at least 7 digits) with a snapshot folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_HEX = re.compile(r"[0-9a-f]{7,40}")
DEFAULT_REVISION = "main"


class HubError(Exception):
    """A hub id or revision that the local cache does not have."""

    def __init__(self, message: str, notes: tuple[str, ...] = (), help: str | None = None, absent: bool = False):
        self.message, self.notes, self.help = message, notes, help
        self.absent = absent  # the model is not in the cache: downloading it or passing a path would help
        super().__init__(message)


def looks_like_hub_id(text: str) -> bool:
    """`owner/name`: one slash, no `..`, not a path that starts at / or ~."""
    return _HUB_ID.fullmatch(text) is not None and ".." not in text


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    """The hub cache folder the environment selects (it need not exist)."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _download_help(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"download it with `huggingface-cli download {repo_id}{rev}`"


def _available(repo: Path) -> list[str]:
    """`branch (abc1234)` for every ref, then every snapshot's commit."""
    found = []
    refs = repo / "refs"
    if refs.is_dir():
        for ref in sorted(p for p in refs.rglob("*") if p.is_file()):
            try:
                commit = ref.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                continue
            found.append(f"{ref.relative_to(refs).as_posix()} ({commit[:7]})")
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        found += sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    return found


def resolve(repo_id: str, revision: str | None = None, cache: Path | None = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` (default: main) in the local cache."""
    cache = cache_dir() if cache is None else Path(cache)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise HubError(f"`{repo_id}` is not in the local Hugging Face cache",
                       notes=(f"searched {cache} for {repo.name}",), help=_download_help(repo_id, revision), absent=True)
    rev = revision or DEFAULT_REVISION
    snapshots = repo / "snapshots"
    ref = repo / "refs" / rev
    commit = None
    if ".." not in Path(rev).parts and not Path(rev).is_absolute() and ref.is_file():
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise HubError(f"cannot read {ref}: {exc}") from None
    elif _HEX.fullmatch(rev) and snapshots.is_dir():
        hits = [p.name for p in snapshots.iterdir() if p.is_dir() and p.name.startswith(rev)]
        if len(hits) == 1:
            commit = hits[0]
        elif len(hits) > 1:
            raise HubError(f"commit prefix `{rev}` of `{repo_id}` is ambiguous: it starts {', '.join(sorted(hits))}",
                           help="write more digits of the commit hash")
    if commit is None:
        have = _available(repo)
        raise HubError(f"the local Hugging Face cache has no revision `{rev}` of `{repo_id}`",
                       notes=(f"searched {repo}",
                              "the cache has: " + (", ".join(have) if have else "no revisions")),
                       help=_download_help(repo_id, rev), absent=True)
    folder = snapshots / commit
    if not folder.is_dir():
        raise HubError(f"revision `{rev}` of `{repo_id}` points to commit {commit}, but the cache has no "
                       "snapshot folder for it", notes=(f"looked for {folder}",),
                       help=_download_help(repo_id, rev), absent=True)
    return folder


def locate(text: str, folder: Path, revision: str | None = None, cache: Path | None = None) -> Path:
    """The checkpoint folder for `model(text, revision=...)`: `folder` (text read as a path) when it
    exists, else the cached snapshot when text is a hub id, else `folder` (reported missing later)."""
    if folder.exists():
        if revision is not None:
            raise HubError(f"`revision=` applies to hub ids, but `{text}` is the local folder {folder}",
                           help="remove `revision=`, or rename the folder if you meant the hub id")
        return folder
    if looks_like_hub_id(text):
        try:
            return resolve(text, revision, cache)
        except HubError as e:
            e.notes += (f"there is no folder {folder} either",)
            raise
    if revision is not None:
        raise HubError(f"`revision=` needs a hub id `owner/name`, found `{text}`",
                       notes=(f"there is no folder {folder}",), help="remove `revision=`, or name a hub id")
    return folder
