"""Publishing an export to the Hugging Face Hub (diffusers' `--push_to_hub`, kohya's `--huggingface_repo_id`).

The export is written and verified on disk first, as always; `push_export` then uploads it in one commit: a diffusers
or merged folder with its model card, or an exported file with a pivotal run's embedding and a model card made for the
repo. `check_can_push` runs before anything is written, so a bad repo id, a switched-off hub or a missing login cost
no export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dreamlora.errors import DreamloraError, ExportError

log = logging.getLogger(__name__)


def check_can_push(repo_id: str) -> None:
    """A valid `owner/name` repo id, the hub not switched off (HF_HUB_OFFLINE) and a token to write with."""
    import huggingface_hub
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a hub repo id ({error}); pass OWNER/NAME, e.g. your-name/sks-dog-lora") from error
    from dreamlora.models import hub_offline

    if hub_offline() or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ExportError("--push-to-hub needs the Hugging Face hub, but HF_HUB_OFFLINE is set; unset it, or export without --push-to-hub and upload later with `hf upload`")
    if not huggingface_hub.get_token():
        raise ExportError("--push-to-hub needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN, then export again")


def push_export(paths: list[Path], repo_id: str, private: bool, message: str, extra: dict[str, bytes] | None = None) -> str:
    """Create `repo_id` (an existing repo is kept, with its visibility) and upload `paths` in one commit: a folder's
    files at the repo's top, a file under its own name, and `extra` files (name: content; an exported file's model
    card). Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    operations = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        root = path if path.is_dir() else path.parent
        operations += [CommitOperationAdd(path_in_repo=file.relative_to(root).as_posix(), path_or_fileobj=str(file)) for file in files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in (extra or {}).items()]
    kept = ", ".join(f"'{p}'" for p in paths)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the hub's default visibility
        commit = api.create_commit(repo_id, operations=operations, commit_message=message)
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise ExportError(
                f"the hub refused to write to {repo_id!r} ({status}): the token cannot write there; log in with a write token (`hf auth login`) "
                f"or pick a repo you own. The export is kept at {kept}; upload it with `hf upload {repo_id} {paths[0]}`"
            ) from error
        raise DreamloraError(f"the upload to {repo_id!r} failed ({error}); the export is kept at {kept}; try again with `hf upload {repo_id} {paths[0]}`") from error
    except Exception as error:  # noqa: BLE001 - no connection: an OSError, or the HTTP client's transport error
        if not (isinstance(error, OSError) or _is_transport_error(error)):
            raise
        raise DreamloraError(f"the hub could not be reached ({error}); the export is kept at {kept}; upload it later with `hf upload {repo_id} {paths[0]}`") from error
    log.info("pushed %d files to %s", len(operations), repo_id)
    return str(getattr(commit, "commit_url", "") or f"https://huggingface.co/{repo_id}")


def _is_transport_error(error: Exception) -> bool:
    """A network failure of the HTTP client huggingface_hub uses (httpx, or its successor httpx2): a `TransportError`."""
    return type(error).__module__.split(".")[0].startswith("httpx") and any(c.__name__ == "TransportError" for c in type(error).__mro__)


def hub_lora_file(ref: str) -> Path | None:
    """The LoRA file a hub reference names: `OWNER/NAME` (its pytorch_lora_weights.safetensors, else its one top-level
    .safetensors file) or `OWNER/NAME/FILE.safetensors`, downloaded once into the Hugging Face cache and read from
    there offline (as diffusers' load_lora_weights takes a repo). None when `ref` is not shaped like one."""
    from huggingface_hub.utils import validate_repo_id

    parts = ref.strip("/").split("/")
    if len(parts) < 2 or not all(parts) or (len(parts) == 2 and "." in parts[1] and parts[1].endswith((".safetensors", ".ckpt", ".pt", ".bin"))):
        return None  # not OWNER/NAME...; FOLDER/FILE.safetensors is a local file that is not there
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo)
    except ValueError:
        return None
    if filename and not filename.endswith(".safetensors"):
        raise ExportError(f"'{ref}': dreamlora reads only .safetensors LoRAs (pickle files can run code); name the repo's .safetensors file")
    from dreamlora.models import hub_reachable

    online = hub_reachable()
    try:
        return _download(repo, filename or _pick_file(repo, online, ref), online)
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 - huggingface_hub's not-found, offline and network errors alike
        where = "and the hub is unreachable from this machine" if not online else f"and the hub did not give it ({type(error).__name__})"
        raise ExportError(
            f"'{ref}' is not a file or folder here, and as a Hugging Face LoRA it is not in the local cache {where}; "
            f"pass a local path, or download it where there is network (`hf download {repo}`)"
        ) from error


def _pick_file(repo: str, online: bool, ref: str) -> str:
    """The LoRA file of a repo given without one: pytorch_lora_weights.safetensors (what diffusers writes and
    load_lora_weights looks for first), else its only top-level .safetensors."""
    from dreamlora.lora import LORA_FILE

    if online:
        from huggingface_hub import HfApi

        names = [n for n in HfApi().list_repo_files(repo) if "/" not in n and n.endswith(".safetensors")]
    else:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo, local_files_only=True))  # the cached revision of main
        names = [p.name for p in snapshot.glob("*.safetensors")]
    if LORA_FILE in names or len(names) == 1:
        return LORA_FILE if LORA_FILE in names else names[0]
    listed = ", ".join(sorted(names)) or "none"
    raise ExportError(f"hub repo {repo!r} holds {len(names)} top-level .safetensors files ({listed}); name one: {ref}/FILE.safetensors")


def _download(repo: str, filename: str, online: bool) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, local_files_only=not online))
