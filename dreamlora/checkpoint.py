"""Run-folder layout: run info, final LoRA, checkpoints written atomically, and finding them again.

```
runs/<name>/
  config.toml                      resolved config, written before step 0
  run.json                         model, family, prompts, rank/alpha, steps done
  metrics.jsonl                    one line per logged step
  lora/pytorch_lora_weights.safetensors      final LoRA, diffusers format with adapter metadata
  checkpoints/step-000200/         lora/ + state.safetensors + state.json (optimizer, LR schedule, scaler, RNG states, step)
  samples/                         sample grids
```
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dreamlora.errors import ConfigError, ExportError, TrainingError
from dreamlora.lora import LORA_FILE

RUN_INFO = "run.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
LORA_DIR = "lora"
CHECKPOINTS_DIR = "checkpoints"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:  # named by the file the user asked for, not the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def next_free_path(path: Path, suffix: str = "") -> Path:
    """`path` if nothing is there, else the first of `path-2`, `path-3`, ... that is free; a `suffix` (".md") goes
    after the number: `table.md`, `table-2.md`, ..."""
    path, n = Path(path), 2
    free = path.with_name(path.name + suffix)
    while free.exists():
        free, n = path.with_name(f"{path.name}-{n}{suffix}"), n + 1
    return free


def refuse_existing_run(path: Path) -> None:
    """An explicit run folder (--out) that is there already is never written into."""
    if path.exists():
        raise ConfigError(f"run folder '{path}' already exists and is never overwritten; choose another --out, or add --resume to continue it")


def create_run_dir(path: Path, auto_named: bool) -> Path:
    """A new run folder. An explicit existing folder is refused; an automatic name gets the next free suffix."""
    if not auto_named:
        refuse_existing_run(path)
    elif path.exists():
        path = next_free_path(path)
    path.mkdir(parents=True)
    return path


def not_a_run(folder: Path) -> ExportError:
    """The error for a folder without run.json, naming the LoRA files it holds (a downloaded LoRA's folder, say)."""
    files = sorted(p.name for p in Path(folder).glob("*.safetensors"))
    hint = f"; it holds {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}: pass the file itself" if files else ""
    return ExportError(f"'{folder}' is not a run folder (no {RUN_INFO}){hint}; pass a run folder (runs/NAME) or a LoRA .safetensors file")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        raise not_a_run(Path(run_dir))
    return json.loads(path.read_text(encoding="utf-8"))


def latest_run(runs_root: Path = Path("runs")) -> Path:
    """The most recently updated run under `runs/`."""
    runs = [p.parent for p in Path(runs_root).glob(f"*/{RUN_INFO}")]
    if not runs:
        raise ExportError(f"no runs found in '{runs_root}/'; train one with `dreamlora train`, or pass --run PATH")
    return max(runs, key=lambda p: (p / RUN_INFO).stat().st_mtime)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first; a folder without its state.json (written last) is not complete."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS_DIR).glob("step-*"):
        if path.is_dir() and (path / STATE_JSON).is_file() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def hub_shaped(path: Path) -> bool:
    """A path that is not here but may name a Hugging Face repo: relative OWNER/NAME[/FILE] whose first folder is not
    here either (runs/typo, with runs/ here, never is)."""
    path = Path(path)
    return len(path.parts) >= 2 and not path.is_absolute() and not Path(path.parts[0]).exists()


def find_lora(path: Path, step: int | None = None) -> Path:
    """The LoRA file of a run folder (final, or at `step`), a checkpoint folder, a file given directly, or a LoRA on the
    Hugging Face Hub (`OWNER/NAME[/FILE.safetensors]`, read from the cache: `hub.hub_lora_file`) where no such path is."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        if step is None and hub_shaped(path):
            from dreamlora.hub import hub_lora_file

            if (found := hub_lora_file(path.as_posix())) is not None:
                return found
        raise ExportError(f"'{path}' does not exist; pass a run folder (runs/NAME) or a LoRA .safetensors file")
    if step is not None:
        folder = checkpoint_dir(path, step)
        if not (folder / STATE_JSON).is_file():
            have = ", ".join(str(s) for s, _ in list_checkpoints(path)) or "none"
            raise ExportError(f"run '{path}' has no complete checkpoint at step {step}; checkpoints: {have}")
        return folder / LORA_DIR / LORA_FILE
    for candidate in (path / LORA_DIR / LORA_FILE, path / LORA_FILE):
        if candidate.is_file():
            return candidate
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest / LORA_DIR / LORA_FILE
    if not (path / RUN_INFO).is_file():
        raise not_a_run(path)
    raise ExportError(f"run '{path}' has no LoRA weights yet (no final LoRA, no checkpoint); let it train to its first checkpoint or to the end")


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, write_lora: Any, training_state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint into a temporary folder, flush it, then rename it into place; prune to the newest `keep`.

    `write_lora(folder)` writes the LoRA file; `training_state` holds `optimizer` (a state dict), optionally
    `rng` (from `capture_rng_state`), and JSON-able `lr_scheduler`, `scaler` and anything else needed to continue exactly.
    A failed write (disk full, unwritable folder) leaves the earlier checkpoints untouched and raises a TrainingError.
    """
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        write_lora(tmp / LORA_DIR)
        state = dict(training_state)
        tensors, optimizer_meta = _flatten_optimizer(state.pop("optimizer"))
        rng_tensors, rng_meta = _flatten_rng(state.pop("rng", None))
        save_file({**tensors, **rng_tensors}, str(tmp / STATE_TENSORS))
        _fsync_tree(tmp)
        write_json(tmp / STATE_JSON, {"step": step, "optimizer": optimizer_meta, "rng": rng_meta, **state})  # last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(write_failure(f"checkpoint step {step}", final, error, run_dir)) from error
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_failure(what: str, path: Path, error: OSError, run_dir: Path) -> str:
    """The message for a write that failed: why, where, and what is still safe."""
    reason = {
        errno.ENOSPC: "the disk is full",
        getattr(errno, "EDQUOT", -1): "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "the folder is not writable",
        errno.EPERM: "the folder is not writable",
    }.get(error.errno or 0, "it could not be written")
    latest = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {latest.name} is intact; free space and continue with `dreamlora train --out {run_dir} --resume`" if latest else "no earlier checkpoint exists"
    return f"could not write {what} to '{path}': {reason} ({error.strerror or error}); {kept}"


def temporary_folder_beside(final: Path) -> Path:
    """A new hidden folder next to `final`, to be renamed into place; a refusal names `final`, not the temporary name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(final)) from error


def write_folder_atomic(folder: Path, write: Any, replace: bool = True) -> Path:
    """Write a folder's files with `write(tmp_folder)` beside it, flush, then swap it into place (replacing an older
    one unless `replace` is off: then a folder that appeared meanwhile makes the rename fail and is left alone)."""
    tmp = temporary_folder_beside(folder)
    try:
        write(tmp)
        _fsync_tree(tmp)
        if replace and folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a folder to disk, so a rename after it never exposes empty files after a power loss."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the files are flushed already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- RNG states --------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states (adapter init and dropout draw from the global generators)."""
    import numpy as np

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators back to a `capture_rng_state` result (or one read from a checkpoint)."""
    import numpy as np

    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten_rng(state: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if state is None:
        return {}, None
    tensors = {"rng.torch": state["torch"].clone()}
    for index, cuda_state in enumerate(state.get("cuda", [])):
        tensors[f"rng.cuda.{index}"] = cuda_state.clone()
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "cuda_devices": len(state.get("cuda", [])),
    }
    return tensors, meta


def _unflatten_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> dict[str, Any] | None:
    if not meta:
        return None
    import numpy as np

    version, internal, gauss = meta["python"]
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    return {
        "python": (version, tuple(internal), gauss),
        "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached),
        "torch": tensors["rng.torch"],
        "cuda": [tensors[f"rng.cuda.{i}"] for i in range(meta.get("cuda_devices", 0))],
    }


def load_checkpoint_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder, with the optimizer state dict rebuilt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        raise ConfigError(f"'{folder}' is not a complete dreamlora checkpoint (no {STATE_JSON}); pass a folder under runs/<name>/checkpoints/")
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as error:
        raise ConfigError(f"checkpoint '{folder}' cannot be read ({error}); resume from an earlier one with --resume-from") from error
    state["optimizer"] = _unflatten_optimizer(tensors, state["optimizer"])
    state["rng"] = _unflatten_rng(tensors, state.get("rng"))
    return state


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (one per logged step), oldest first; empty when there is no file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
