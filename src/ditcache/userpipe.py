"""The user's own pipeline on the command line: `--pipeline SPEC`, `--prompts FILE`, `--call key=value`.

A SPEC is either a local folder written by `pipe.save_pretrained(folder)` (loaded on the CPU with
`diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)`, never downloading) or a factory,
`module.path:factory` or `path/to/file.py:factory`, called with no arguments and returning the pipeline.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FORMS = (
    "a local folder saved with `pipe.save_pretrained(folder)`, "
    "or a factory returning the pipeline: `module.path:factory` or `path/to/file.py:factory`"
)
# Call arguments the commands set themselves (from --prompts, --steps, --seed and the output they need).
RESERVED = ("prompt", "num_inference_steps", "generator", "output_type")


def _spec_error(option: str, spec: str, why: str) -> ValueError:
    return ValueError(f"{option} {spec!r}: {why}; expected {FORMS}")


def load_pipeline(spec: str, *, option: str = "--pipeline") -> Any:
    """Load a diffusers pipeline from a saved folder or a `module:factory` / `file.py:factory` spec.

    Args:
        spec: the folder or the factory spec (see the module docstring).
        option: the parameter name the error messages use.

    Raises:
        ValueError: for a missing folder, a spec without `:factory`, a module or file that does not exist,
            a factory that is not found or does not return a pipeline.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _spec_error(option, str(spec), "empty")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise _spec_error(option, spec, "the folder has no model_index.json (not written by save_pretrained)")
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    target, colon, name = spec.rpartition(":")
    if not colon or not target or not name:
        raise _spec_error(option, spec, "no such folder, and not of the form `target:factory`")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(option, spec, Path(target).expanduser())
    else:
        module = _import_module(option, spec, target)
    factory = getattr(module, name, None)
    if factory is None:
        raise _spec_error(option, spec, f"{target} has no attribute {name!r}")
    if not callable(factory):
        raise _spec_error(option, spec, f"{target}.{name} is not callable")
    pipe = factory()
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module) or not callable(pipe):
        raise _spec_error(
            option, spec, f"the factory returned {type(pipe).__name__}, not a pipeline with a `.transformer`"
        )
    return pipe


def _import_file(option: str, spec: str, path: Path) -> Any:
    if not path.is_file():
        raise _spec_error(option, spec, f"file {str(path)!r} not found")
    name = f"_ditcache_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise _spec_error(option, spec, f"cannot import {str(path)!r} as Python")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:  # like running the file: its siblings import
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(option: str, spec: str, target: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:  # console scripts: modules of the working directory
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        # Only a missing module named by the spec is a spec error; a missing dependency inside it is not.
        if error.name and (target == error.name or target.startswith(error.name + ".")):
            raise _spec_error(option, spec, f"no module named {error.name!r}") from None
        raise


def read_prompts(path: str | Path, *, option: str = "--prompts") -> list[str]:
    """One prompt per non-empty line; lines starting with `#` are comments."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{option} {str(path)!r}: file not found (one prompt per line, # comments)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{option} {str(path)!r}: no prompts (one prompt per non-empty line, # comments)")
    return prompts


def pipeline_kwargs(items: Sequence[str] | None, *, option: str = "--call") -> dict[str, Any]:
    """Parse repeated `key=value` options into pipeline call arguments.

    Values are Python literals when they parse as one (`3.0`, `16`, `None`, `True`, `'a b'`, `(1, 2)`),
    else strings (`negative_prompt=blurry`).
    """
    kwargs: dict[str, Any] = {}
    for item in items or ():
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"{option} {item!r}: expected key=value, e.g. {option} true_cfg_scale=3.0")
        if key in RESERVED:
            raise ValueError(f"{option} {key}=...: set by the command itself (--prompts, --steps, --seed)")
        if key in kwargs:
            raise ValueError(f"{option} {key}=... given twice")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[key] = text
    return kwargs


def images(result: Any) -> torch.Tensor:
    """A pipeline's `output_type="pt"` output -> (B, 3, H, W) images or (B, 3, F, H, W) videos in [-1, 1]."""
    x = getattr(result, "images", None)
    if x is None:
        x = getattr(result, "frames", None)
    if x is None and isinstance(result, (tuple, list)) and result:
        x = result[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the pipeline returned {type(result).__name__} without tensor images or frames")
    x = x.detach().float().cpu()
    if x.ndim == 5 and x.shape[2] == 3 and x.shape[1] != 3:  # (B, F, C, H, W) -> (B, C, F, H, W)
        x = x.permute(0, 2, 1, 3, 4)
    return x * 2 - 1


def generate(pipe: Any, prompts: Sequence[str], steps: int, seed: int, call: dict[str, Any]) -> torch.Tensor:
    """One generation of every prompt, seeded, as tensors in [-1, 1] (see `images`)."""
    result = pipe(
        prompt=list(prompts),
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **call,
    )
    return images(result)
