"""Context parallelism through diffusers (Ulysses / ring), on GPUs over NCCL and on CPUs over gloo.

`enable_context_parallel(transformer, ulysses_degree=N)` shards the tokens of every block over the ranks with
diffusers' own `ContextParallelConfig` and the model's `_cp_plan`; `ditcache.apply` afterwards caches on top,
with every decision statistic reduced over the context-parallel group (`ditcache.engine.decisions`), so all
ranks reuse or compute the same step / block together.

The CPU workaround. diffusers 0.42's `enable_parallelism` places each rank on
`torch.device(type, rank % torch.accelerator.device_count())`, a division by zero on a machine without an
accelerator. Where no accelerator is present we make the same three moves it makes, in the same order, with
the CPU as the device: build the device mesh and record the `ParallelConfig` on the model (`config.setup`),
hand the config to every attention processor, and register diffusers' split / gather hooks from the model's
`_cp_plan` (`apply_context_parallel`). With an accelerator, `enable_parallelism` itself runs. diffusers is
never edited or patched. Its output gather works on tensors only, which is why the `_cp_plan` gathers at
`proj_out` inside the model; the reference pipelines call the model with `return_dict=False` either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..engine.decisions import DECISION_GROUP_ATTR, DecisionGroup, Sharding, context_parallel_config

__all__ = ["enable_context_parallel", "set_decision_group", "supports_context_parallel"]


def supports_context_parallel(model: torch.nn.Module) -> bool:
    """Whether diffusers ships a context-parallel plan (`_cp_plan`) for the model's class."""
    return getattr(model, "_cp_plan", None) is not None


def enable_context_parallel(model: torch.nn.Module, ulysses_degree: int | None = None, ring_degree: int = 1) -> object:
    """Shard `model`'s tokens over the default process group with diffusers' context parallelism.

    Call it on every rank, after `torch.distributed` is initialised (`ditcache.parallel.init_distributed()`)
    and before `ditcache.apply`.

    Args:
        model: a diffusers transformer whose class has a `_cp_plan` (Flux, Wan, QwenImage, ...).
        ulysses_degree: ranks that split the attention heads (all-to-all); default: the world size over
            `ring_degree`.
        ring_degree: ranks that pass key / value blocks around a ring (needs an attention backend that returns
            the log-sum-exp; diffusers' native backend does).

    Returns:
        The `ParallelConfig` diffusers recorded on the model.

    Raises:
        RuntimeError: torch.distributed is not initialised, or the model already has a parallel config.
        TypeError: the model's class has no `_cp_plan`.
        ValueError: a degree is not a positive integer, or ulysses_degree x ring_degree is not the world size.
    """
    from diffusers.models._modeling_parallel import ContextParallelConfig

    if not supports_context_parallel(model):
        raise TypeError(
            f"{type(model).__name__} has no context-parallel plan (_cp_plan) in diffusers; use --parallel data"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "enable_context_parallel needs torch.distributed initialised: call ditcache.parallel.init_distributed()"
        )
    if context_parallel_config(model) is not None or getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError(f"this {type(model).__name__} already has a parallel config")
    world = dist.get_world_size()
    ring_degree = _degree("ring_degree", ring_degree)
    ulysses_degree = _degree("ulysses_degree", world // ring_degree if ulysses_degree is None else ulysses_degree)
    if ulysses_degree * ring_degree != world:
        raise ValueError(
            f"ulysses_degree x ring_degree must equal the world size {world}, got {ulysses_degree} x {ring_degree}"
        )
    accelerator = torch.accelerator.is_available() and torch.accelerator.device_count() > 0
    if ring_degree > 1 and not accelerator:
        # Ring attention merges partial results by their log-sum-exp; diffusers' native (SDPA) backend, the
        # one that runs on a CPU, does not return it ("Native attention does not support return_lse=True").
        raise ValueError(
            "ring_degree > 1 needs an attention backend that returns the log-sum-exp (flash, _native_cudnn, sage: "
            "GPU only); on the CPU use ulysses_degree"
        )
    config = ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree)
    if accelerator:
        model.enable_parallelism(config=config)
    else:
        _enable_on_cpu(model, config)
    return model._parallel_config


def _degree(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _enable_on_cpu(model: torch.nn.Module, cp_config: object) -> None:
    """`ModelMixin.enable_parallelism`'s context-parallel path with the CPU as the device (module docstring)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=cp_config)
    mesh = dist.device_mesh.init_device_mesh(
        "cpu", mesh_shape=cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names
    )
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp_config, model._cp_plan)


def set_decision_group(
    model: torch.nn.Module, group: dist.ProcessGroup | None, sharding: Sharding = Sharding.TOKENS
) -> None:
    """Reduce `model`'s decision statistics over `group`: a sequence-parallel runtime other than diffusers'
    (xDiT; `Sharding.TOKENS`), or the ranks of a data-parallel batch (`Sharding.ROWS`, every statistic is
    reduced). None goes back to diffusers' context-parallel mesh, if any. Call before `ditcache.apply`.

    Raises:
        TypeError: `sharding` is not a `ditcache.engine.decisions.Sharding`.
    """
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be Sharding.TOKENS or Sharding.ROWS, got {sharding!r}")
    if group is None:
        model.__dict__.pop(DECISION_GROUP_ATTR, None)
    else:
        model.__dict__[DECISION_GROUP_ATTR] = DecisionGroup(group, sharding)
