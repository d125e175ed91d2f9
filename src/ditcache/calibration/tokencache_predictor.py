"""TokenCache's Cache Predictor, its LoRA refiners and the profile that carries their weights.

- `CachePredictor`: one copy of the model's first block (its weights as the initialisation, conditioned like
  the model's blocks: it is called with block 0's own arguments), followed by a head that gives one score per
  token and block (sigmoid). Called once per P-step with block 0's inputs (embedded tokens, timestep / class /
  text conditioning as the model passes them).
- `LoRA`: rank-r adapters for every `nn.Linear` of the refiner blocks (the last K), applied only inside
  `applied(block)` (forward hooks when training, a swapped-in merged weight at inference), undone on exit, so
  the model itself is never changed.
- `TokenCacheProfile`: a `Profile` whose `save(path)` also writes the weights as safetensors next to the
  JSON (`<stem>.safetensors`, never pickle); `load_tensors(profile, path)` reads them back.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .profiles import Profile, profile_dirs

WEIGHT_DTYPE = torch.float16  # on disk; ~half the bytes, far below the predictor's useful precision


def clean_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` without instance-level `forward` overrides (the engine's hooks), frozen."""
    duplicate = copy.deepcopy(module)
    for sub in duplicate.modules():
        sub.__dict__.pop("forward", None)
    return duplicate


def token_stream_of(output: Any, outputs: tuple[str, ...], stream: str) -> torch.Tensor:
    """The token stream in a block's output (a bare tensor, or a tuple named by the adapter's outputs)."""
    if len(outputs) == 1:
        return output
    return dict(zip(outputs, output))[stream]


class CachePredictor(torch.nn.Module):
    """alpha_theta(x_t, t): a copy of block 0 + a LayerNorm / Linear head, sigmoid scores (rows, tokens, blocks)."""

    def __init__(self, block: torch.nn.Module, width: int, num_blocks: int, outputs: tuple[str, ...], stream: str):
        super().__init__()
        self.block = clean_copy(block)
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.head = torch.nn.Linear(width, num_blocks)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)
        self.outputs, self.stream = tuple(outputs), stream

    def forward(self, **arguments: Any) -> torch.Tensor:
        output = self.block(**arguments)
        tokens = token_stream_of(output, self.outputs, self.stream)
        return torch.sigmoid(self.head(self.norm(tokens)))


class LoRALinear(torch.nn.Module):
    """delta(x) = up(down(x)) * scale, added to an `nn.Linear`'s output; `up` starts at zero."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.down = torch.nn.Linear(linear.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, linear.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        torch.nn.init.zeros_(self.up.weight)
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.scale


@dataclasses.dataclass
class _Merged:
    """One adapted Linear's merged weight W + scale x up @ down, valid while W is the same unchanged tensor."""

    module: torch.nn.Linear
    source: torch.Tensor  # the Parameter it was merged from
    version: int  # source._version when merged (in-place edits bump it)
    weight: torch.nn.Parameter


class LoRA(torch.nn.Module):
    """LoRA adapters for every `nn.Linear` of some blocks, keyed "<block position>.<module name>"."""

    def __init__(self, blocks: Mapping[int, torch.nn.Module], rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.adapters = torch.nn.ModuleDict()
        for position, block in blocks.items():
            for name, module in block.named_modules():
                if isinstance(module, torch.nn.Linear):
                    self.adapters[_key(position, name)] = LoRALinear(module, rank)
        self._merged: dict[int, list[_Merged]] = {}

    @property
    def positions(self) -> set[int]:
        return {int(key.split("|")[0]) for key in self.adapters}

    def _adapted(self, position: int, block: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, LoRALinear]]:
        for name, module in block.named_modules():
            key = _key(position, name)
            if key in self.adapters:
                yield module, self.adapters[key]

    @contextlib.contextmanager
    def applied(self, position: int, block: torch.nn.Module) -> Iterator[None]:
        """While inside, every adapted `nn.Linear` of `block` adds its LoRA delta; on exit the block is exactly as
        before. Training (gradients wanted): forward hooks adding up(down(x)). Inference: the Linear's weight
        Parameter is swapped for a merged copy W + scale x up @ down (made once per base weight version) and
        the original Parameter object is put back; one GEMM per Linear instead of three, which is what keeps
        the refiners' LoRA from eating TokenCache's gain."""
        if self.training or torch.is_grad_enabled():
            with self._hooked(position, block):
                yield
            return
        merged = self._merged_weights(position, block)
        originals = [entry.module._parameters["weight"] for entry in merged]
        try:
            for entry in merged:
                entry.module._parameters["weight"] = entry.weight
            yield
        finally:
            for entry, original in zip(merged, originals):
                entry.module._parameters["weight"] = original

    @contextlib.contextmanager
    def _hooked(self, position: int, block: torch.nn.Module) -> Iterator[None]:
        handles = []
        try:
            for module, adapter in self._adapted(position, block):
                handles.append(
                    module.register_forward_hook(lambda mod, args, out, a=adapter: out + a(args[0]).to(out.dtype))
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _merged_weights(self, position: int, block: torch.nn.Module) -> list[_Merged]:
        cached = self._merged.get(position)
        if cached is not None and all(e.module.weight is e.source and e.source._version == e.version for e in cached):
            return cached
        merged = []
        for module, adapter in self._adapted(position, block):
            weight = module.weight
            delta = (adapter.up.weight.float() @ adapter.down.weight.float()) * adapter.scale
            value = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
            merged.append(_Merged(module, weight, weight._version, torch.nn.Parameter(value, requires_grad=False)))
        self._merged[position] = merged
        return merged


def _key(position: int, name: str) -> str:
    return f"{position}|{name.replace('.', ':')}"  # ModuleDict keys may not contain "."


# ------------------------------------------------------------------------------------------------- profile
@dataclasses.dataclass
class TokenCacheProfile(Profile):
    """A `Profile` plus the predictor / LoRA tensors; `save(path)` writes `<stem>.safetensors` next to the JSON
    and records its name and SHA-256 in `data["weights"]` / `data["weights_sha256"]`."""

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = path.with_suffix(".safetensors")
        save_file({k: v.detach().to(WEIGHT_DTYPE).contiguous() for k, v in self.tensors.items()}, str(weights))
        self.data["weights"] = weights.name
        self.data["weights_sha256"] = _sha256(weights)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Profile)}
        path.write_text(json.dumps(fields, indent=1) + "\n")
        return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tensors(profile: Profile, given: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The weights of a TokenCache profile: the file `data["weights"]` next to `given` (a profile path) or in
    the profile directories `find_profile` searched, checked against its SHA-256."""
    if isinstance(profile, TokenCacheProfile) and profile.tensors:
        return {k: v.float() for k, v in profile.tensors.items()}
    name = profile.data.get("weights")
    if not name:
        raise ValueError(
            "this TokenCache profile names no weights file; recalibrate with `ditcache calibrate tokencache`"
        )
    folders = [Path(given).parent] if given is not None else profile_dirs()
    for folder in folders:
        path = folder / name
        if path.exists():
            if _sha256(path) != profile.data.get("weights_sha256"):
                raise ValueError(f"{path} does not match its profile (SHA-256 differs); recalibrate TokenCache")
            return {k: v.float() for k, v in load_file(str(path)).items()}
    raise FileNotFoundError(
        f"TokenCache predictor weights {name!r} not found in {', '.join(map(str, folders))}; "
        "run `ditcache calibrate tokencache ...` (or `ditcache.calibrate(model_or_pipe, 'tokencache', ...)`)"
    )


def split_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(predictor state dict, LoRA state dict) from a profile's flat tensor dict ("predictor." / "lora." keys)."""
    predictor = {k[len("predictor.") :]: v for k, v in tensors.items() if k.startswith("predictor.")}
    lora = {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")}
    return predictor, lora


def join_tensors(predictor: torch.nn.Module, lora: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    tensors = {f"predictor.{k}": v.detach().clone() for k, v in predictor.state_dict().items()}
    if lora is not None:
        tensors.update({f"lora.{k}": v.detach().clone() for k, v in lora.state_dict().items()})
    return tensors
