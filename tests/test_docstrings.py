"""Every public config documents itself, so `help(ditcache.TeaCacheConfig)` is a usable reference.

The configs checked are every config type behind a preset of `ditcache.presets()` (plus the public configs
without a preset, listed below). A newly registered config therefore fails these tests until its class
docstring has an `Args:` entry for each dataclass field and an `Example:` that runs as a doctest (see
docs/ENGINE.md, "Writing a policy"). `ditcache.apply` and `ditcache.Policy` run their examples too.
"""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import re

import pytest

import ditcache

# Public configs that no preset uses, documented all the same.
CONFIGS_WITHOUT_PRESET = (ditcache.ReuseScheduleConfig,)

CONFIGS = sorted(
    {type(ditcache.preset(name)) for name in ditcache.presets()} | set(CONFIGS_WITHOUT_PRESET),
    key=lambda cls: cls.__name__,
)
BASE_FIELDS = {field.name for field in dataclasses.fields(ditcache.PolicyConfig)}
DOCUMENTED = [*CONFIGS, ditcache.PolicyConfig, ditcache.apply, ditcache.Policy, ditcache.calibrate, ditcache.tune]


def own_docstring(obj: object) -> str:
    """The docstring written on `obj` itself (a dataclass without one gets its signature as `__doc__`)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if not doc or (isinstance(obj, type) and doc.startswith(f"{obj.__name__}(")):
        return ""
    return inspect.cleandoc(doc)


def section(doc: str, title: str) -> str:
    """The body of one diffusers-style section (`Args:`, `Example:`): the lines indented under its header."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == f"{title}:":
            indent = len(line) - len(line.lstrip())
            body = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following)
            return "\n".join(body)
    return ""


@pytest.mark.parametrize("config_type", CONFIGS, ids=lambda cls: cls.__name__)
def test_config_docstring_documents_every_field(config_type):
    doc = own_docstring(config_type)
    assert doc, f"{config_type.__name__} has no class docstring"
    args = section(doc, "Args")
    assert args.strip(), f"{config_type.__name__}'s docstring has no Args: section"
    undocumented = [
        field.name
        for field in dataclasses.fields(config_type)
        if field.name not in BASE_FIELDS  # cache_dtype / cache_device: documented once, on PolicyConfig
        and not re.search(rf"^\s*{re.escape(field.name)}\s*[(:]", args, flags=re.MULTILINE)
    ]
    assert not undocumented, f"{config_type.__name__}'s Args: section does not describe {undocumented}"
    assert ">>>" in section(doc, "Example"), f"{config_type.__name__}'s docstring has no Example: section"


@pytest.mark.parametrize("obj", DOCUMENTED, ids=lambda obj: obj.__qualname__)
def test_docstring_examples_run(obj):
    name = obj.__qualname__
    # Empty globals: an example must import what it uses, as a reader of help() would.
    tests = doctest.DocTestFinder().find(obj, name, globs={})
    own = [test for test in tests if test.name == name]
    assert own and own[0].examples, f"{name}'s docstring has no doctest example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
