"""`pull`: fetch a model's files from the Hugging Face Hub (or `HF_ENDPOINT`), resumably, verified, then convert.

huggingface_hub gives the file list, hashes, URLs, auth headers and HTTP session. The byte transfer is our
own so that a download resumes across runs: bytes go to FILE.partial, a later attempt or a later `pull`
continues from its size with an HTTP Range request, and only a file whose sha256 (LFS) or git blob id
matches the hub's is renamed into place.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import LilmistralError
from .registry import ModelRef
from .store import Store, human_size, require_space

CHUNK = 1 << 20
OnBytes = Callable[[int], None]  # told the byte counts of a file (or a conversion) as they come
# a GGUF file's type at the end of its name (model.Q4_K_M.gguf, model-Q4_K_M.gguf), before a split's part number
GGUF_FILE = re.compile(r"[-.]([A-Za-z0-9_]+)(?:-\d{5}-of-\d{5})?\.gguf$")
RETRIES = 5


class OfflineError(LilmistralError):
    """The hub cannot be reached (pulled models still run)."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 (small files)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _gated_message(repo: str) -> str:
    return (f"{repo} is gated: accept its licence at {endpoint()}/{repo} while logged in, then set HF_TOKEN "
            f"(or run `huggingface-cli login`)")


def _hub_errors(repo: str, call: Callable):
    """Run a hub call, turning its failures into one-line errors (never showing the token)."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return call()
    except GatedRepoError:
        raise LilmistralError(_gated_message(repo)) from None
    except RevisionNotFoundError:
        raise LilmistralError(f"{repo}: revision not found on {endpoint()}") from None
    except RepositoryNotFoundError:
        hint = "" if _token() else " (if it is private or gated, set HF_TOKEN)"
        raise LilmistralError(f"{repo} was not found on {endpoint()}{hint}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise LilmistralError(_gated_message(repo)) from None
        raise LilmistralError(f"{repo}: the hub answered {status}") from None
    except (httpx2.TransportError, OSError) as e:
        raise OfflineError(f"cannot reach {endpoint()} ({type(e).__name__}); pulled models still run offline") \
            from None


def repo_files(ref: ModelRef) -> tuple[str, list[RemoteFile]]:
    """The commit the revision points at, and every file of the repo with its size and hash."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint())
    info = _hub_errors(ref.repo, lambda: api.model_info(ref.repo, revision=ref.revision, files_metadata=True,
                                                        token=_token()))
    files = [RemoteFile(s.rfilename, s.lfs.size if s.lfs else (s.size or 0), s.lfs.sha256 if s.lfs else None,
                        s.blob_id) for s in info.siblings or []]
    return info.sha or ref.revision, files


def gguf_types(files: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """The repo's GGUF files at its root by type, lower-cased: `model.Q4_K_M.gguf` and `model-Q4_K_M.gguf` are
    q4_k_m; the parts of a split file (`...-00001-of-00002.gguf`) one entry."""
    types: dict[str, list[RemoteFile]] = {}
    for f in files:
        match = None if "/" in f.name else GGUF_FILE.search(f.name)
        if match:
            types.setdefault(match.group(1).lower(), []).append(f)
    return types


def _listed(types: dict[str, list[RemoteFile]]) -> str:
    return ", ".join(t.upper() for t in sorted(types))


def select_gguf(ref: ModelRef, files: list[RemoteFile]) -> list[RemoteFile]:
    """The GGUF file of type ref.gguf, or its parts in order."""
    types = gguf_types(files)
    if not types:
        raise LilmistralError(f"{ref.repo} has no GGUF files: pull {ref.repo}:int4 (or int8, bf16) converts its "
                              "safetensors weights")
    chosen = types.get(ref.gguf)
    if chosen is None:
        raise LilmistralError(f"{ref.repo} has no {ref.gguf.upper()} GGUF file; its types: {_listed(types)}")
    return sorted(chosen, key=lambda f: f.name)


def select_files(ref: ModelRef, files: list[RemoteFile]) -> list[RemoteFile]:
    """The files matching the entry's globs; of the two weight sets Mistral publishes, only one."""
    chosen = [f for f in files if any(fnmatch.fnmatch(f.name, p) for p in ref.files)]
    if any(fnmatch.fnmatch(f.name, "model*.safetensors") for f in chosen):
        chosen = [f for f in chosen if not f.name.startswith("consolidated")]
    if not any(f.name.endswith(".safetensors") for f in chosen):
        types = gguf_types(files)
        fours = [t for t in ("q4_k_m", *sorted(types)) if t in types and t.startswith("q4")]  # a sensible first
        example = fours[0] if fours else min(types, default="")
        hint = f"; it has GGUF files: pull {ref.repo}:{example.upper()} (types: {_listed(types)})" if types else ""
        raise LilmistralError(f"{ref.repo} has no safetensors weights matching the registry entry{hint}")
    if any("/" in f.name or f.name.startswith(".") for f in chosen):
        raise LilmistralError("the repo lists a file outside its root; refusing it")
    return chosen


def verify(path: Path, f: RemoteFile) -> bool:
    if f.sha256:
        h = hashlib.sha256()
    elif f.blob_id:
        h = hashlib.sha1()
        h.update(f"blob {path.stat().st_size}\0".encode())
    else:
        return path.stat().st_size == f.size
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest() == (f.sha256 or f.blob_id)


def _partial_size(dest: Path) -> int:
    partial = dest.with_name(dest.name + ".partial")
    return partial.stat().st_size if partial.exists() else 0


def download_file(repo: str, revision: str, f: RemoteFile, dest: Path, on_bytes: OnBytes) -> None:
    """Download one file to dest, resuming from dest.partial; verify it, then rename it into place."""
    import httpx2
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    partial = dest.with_name(dest.name + ".partial")
    url = hf_hub_url(repo, f.name, revision=revision, endpoint=endpoint())
    headers = build_hf_headers(token=_token(), library_name="lilmistral")
    for attempt in range(RETRIES + 1):
        have = _partial_size(dest)
        if have >= f.size:
            break
        ranged = {**headers, "Range": f"bytes={have}-"} if have else headers
        try:
            with get_session().stream("GET", url, headers=ranged, follow_redirects=True, timeout=30) as r:
                if have and r.status_code == 200:  # the server ignored the range: start over
                    have = 0
                    partial.unlink()
                if r.status_code >= 400:
                    r.read()  # the error's body, for hf_raise_for_status's message
                _hub_errors(repo, lambda: hf_raise_for_status(r))
                with open(partial, "ab") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        on_bytes(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
        except (httpx2.TransportError, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise LilmistralError(f"no space left in {dest.parent} ({human_size(_partial_size(dest))} of "
                                      f"{f.name} kept): free some, then run pull again to resume") from None
            if attempt == RETRIES:
                raise OfflineError(f"downloading {f.name} failed ({type(e).__name__}); run pull again to resume") \
                    from None
            time.sleep(min(2 ** attempt * 0.2, 5))
    if not verify(partial, f):
        partial.unlink()
        raise LilmistralError(f"{f.name}: checksum does not match the hub's (corrupted download, removed); "
                              f"run pull again")
    os.replace(partial, dest)


def pull(ref: ModelRef, store: Store, keep_source: bool = False, force: bool = False,
         on_file: Callable[[str, int, int], OnBytes] | None = None,
         on_convert: Callable[[str, int], OnBytes] | None = None, say: Callable[[str], None] = lambda s: None) -> Path:
    """Make sure `ref` is in the store, up to date with the hub; return its folder. One pull of a model at a
    time (two would append to the same FILE.partial): a second waits for the first, then finds it pulled.

    on_file(name, size, already_have) returns the callback that receives byte counts for that file;
    on_convert(scheme, bytes to write) the one for the conversion's (without it, `say` tells of the conversion).
    """
    with store.pull_lock(ref, on_wait=lambda: say(f"another lilmistral is pulling {ref.display}; waiting for it")):
        return _pull(ref, store, keep_source, force, on_file, on_convert, say)


def _pull(ref: ModelRef, store: Store, keep_source: bool, force: bool,
          on_file: Callable[[str, int, int], OnBytes] | None, on_convert: Callable[[str, int], OnBytes] | None,
          say: Callable[[str], None]) -> Path:
    from .convert import convert, default_scheme, open_source

    installed = store.installed(ref)
    try:
        revision, remote = repo_files(ref)
    except OfflineError:
        if installed:
            say(f"{ref.display}: offline, using the pulled copy")
            return installed.path
        raise
    if installed and installed.manifest.get("revision") == revision and not force:
        say(f"{ref.display} is up to date")
        return installed.path
    if not ref.gguf and ref.quant in gguf_types(remote) and not any(f.name.endswith(".safetensors") for f in remote):
        ref = replace(ref, gguf=ref.quant)  # `owner/name:F16` of a GGUF repo: its F16 file, kept f16
    files = select_gguf(ref, remote) if ref.gguf else select_files(ref, remote)
    folder = store.download_dir(ref, revision)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [(f, _partial_size(folder / f.name)) for f in files if not (folder / f.name).exists()]
    require_space(folder, sum(f.size - have for f, have in missing), f"downloading {ref.display}")
    for f, have in missing:
        on_bytes = on_file(f.name, f.size, have) if on_file else lambda n: None
        download_file(ref.repo, revision, f, folder / f.name, on_bytes)
    source = folder / files[0].name if ref.gguf else folder  # a split GGUF's first part names it
    scheme = ref.quant or default_scheme(open_source(source))  # a GGUF's: as close to its own as there is
    if on_convert is None:
        say(f"converting to {scheme}")
    extra = {"name": ref.name, "tag": ref.tag, "repo": ref.repo, "revision": revision, "license": ref.license,
             "description": ref.description, "num_ctx": ref.num_ctx, "sampling": ref.sampling}
    path = convert(source, store.model_dir(ref), scheme, overwrite=True, extra=extra,
                   on_write=(lambda total: on_convert(scheme, total)) if on_convert else None)
    for download in folder.parent.iterdir():  # and what an earlier revision left half done
        if download != folder or not keep_source:
            shutil.rmtree(download, ignore_errors=True)
    return path
