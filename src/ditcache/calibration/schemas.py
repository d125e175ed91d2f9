"""The profile schema of every shipped calibration method (`validate.register_profile_schema`): what each policy
reads from a profile's `data`, checked on load and against the model's block count when applied."""

from __future__ import annotations

from .validate import Fields, register_profile_schema

WEIGHTS_FILE = r"[\w.-]+\.safetensors"  # a file name next to the profile, never a path elsewhere
SHA256 = r"[0-9a-f]{64}"


def _digit_keys(fields: Fields, field: str) -> None:
    mapping = fields.mapping(field)
    for key in mapping.values:
        if not str(key).isdigit():
            raise fields.fail(f"{field}.{key}", "must be keyed by a block position (a non-negative integer)")


def _keys_below(fields: Fields, field: str, stop: int) -> None:
    for key in fields.mapping(field).values:
        if int(key) >= stop:
            raise fields.fail(f"{field}.{key}", f"names block {key}, but the model has {stop} blocks")


# -------------------------------------------------------------------------------------------- MixCache
def mixcache_data(fields: Fields, num_steps: int) -> None:
    for name in ("theta", "delta1", "delta2", "impact_step", "impact_cfg"):
        fields.number(name, low=0.0)
    _digit_keys(fields, "impact_block")
    impacts = fields.mapping("impact_block")
    for key in impacts.values:
        impacts.series(key, num_steps, low=0.0)
    fields.mapping("mu_sigma", optional=True)


def mixcache_blocks(fields: Fields, num_blocks: int) -> None:
    _keys_below(fields, "impact_block", num_blocks)


# -------------------------------------------------------------------------------------------- OmniCache
def trajectory_data(fields: Fields, num_steps: int) -> None:
    fields.series("gamma", num_steps)
    schedules = fields.mapping("schedules")
    for speed in ("slow", "fast"):
        schedules.indices(speed, num_steps)
    fields.series("curvature", num_steps, nulls=True, optional=True)


def layered_data(fields: Fields, num_steps: int) -> None:
    loss = fields.get("loss")
    if not isinstance(loss, list) or not loss:
        raise fields.fail("loss", "must be a non-empty list (one per block) of per-step losses")
    rows = Fields(fields.source, {str(i): row for i, row in enumerate(loss)}, f"{fields.prefix}.loss")
    for i in range(len(loss)):
        rows.series(str(i), num_steps, low=0.0)
    fields.series("block_macs", len(loss), low=0.0)
    fields.number("forward_macs", low=1.0)
    fields.integer("interval", 1, num_steps, optional=True)
    parents = fields.get("parents", optional=True)
    if parents is not None:
        if not isinstance(parents, list) or len(parents) != len(loss):
            raise fields.fail("parents", f"must list the parents of each of the {len(loss)} blocks")
        table = Fields(fields.source, {str(i): p for i, p in enumerate(parents)}, f"{fields.prefix}.parents")
        for i in range(len(parents)):
            table.indices(str(i), len(loss))
    blocks = fields.get("blocks", optional=True)
    if blocks is not None and (not isinstance(blocks, list) or len(blocks) != len(loss)):
        raise fields.fail("blocks", f"must name the {len(loss)} blocks of 'loss'")


def layered_blocks(fields: Fields, num_blocks: int) -> None:
    if len(fields.values["loss"]) != num_blocks:
        raise fields.fail("loss", f"holds {len(fields.values['loss'])} blocks, but the model has {num_blocks}")


# -------------------------------------------------------------------------------------------- thresholds
def threshold_data(fields: Fields, num_steps: int) -> None:
    """TeaCache / PreciseCache: one statistic per step (null where a step has none), optionally per lag."""
    fields.series("values", num_steps, low=0.0, nulls=True)
    if fields.get("by_lag", optional=True) is not None:
        _digit_keys(fields, "by_lag")
        lags = fields.mapping("by_lag")
        for key in lags.values:
            lags.series(key, num_steps, low=0.0, nulls=True)


# -------------------------------------------------------------------------------------------- TokenCache
def tokencache_data(fields: Fields, num_steps: int) -> None:
    fields.series("mean_scores", num_steps)
    if "uncacheable" in fields.values:  # a model where no block runs on a token subset: nothing else is read
        return
    blocks = fields.integer("num_blocks", 1, 10_000)
    fields.integer("width", 1, 1_000_000)
    fields.integer("refiners", 0, blocks)
    fields.indices("cacheable", blocks)
    fields.integer("lora_rank", 1, 64, optional=True)  # None: trained without refiners (K = 0), no LoRA
    fields.indices("lora_positions", blocks)
    fields.number("beta", optional=True)
    fields.indices("i_steps", num_steps, optional=True)
    fields.string("weights", WEIGHTS_FILE)
    fields.string("weights_sha256", SHA256)


def tokencache_blocks(fields: Fields, num_blocks: int) -> None:
    if "uncacheable" not in fields.values and fields.values["num_blocks"] != num_blocks:
        raise fields.fail("num_blocks", f"is {fields.values['num_blocks']}, but the model has {num_blocks} blocks")


# -------------------------------------------------------------------------------------------- auto
def auto_data(fields: Fields, num_steps: int) -> None:
    """`ditcache.tune`'s winner: a speedup and a config dict that must build a valid config."""
    from ..registry import config_from_dict

    fields.number("speedup", low=1.0)
    config = fields.mapping("config")
    try:
        config_from_dict(dict(config.values))
    except (TypeError, ValueError) as error:
        raise fields.fail("config", f"is not a valid config: {error}") from None


register_profile_schema("mixcache", mixcache_data, mixcache_blocks)
register_profile_schema("omnicache-trajectory", trajectory_data)
register_profile_schema("omnicache-layered", layered_data, layered_blocks)
register_profile_schema("teacache", threshold_data)
register_profile_schema("precisecache", threshold_data)
register_profile_schema("tokencache", tokencache_data, tokencache_blocks)
register_profile_schema("auto", auto_data)
