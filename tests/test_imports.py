"""Every public module imports cleanly whatever is imported first: no import cycle hides behind an order.

The checks run in a fresh interpreter (`sys.executable -c`). Importing torch and diffusers costs seconds, so
the interpreter first imports every module in sorted order (the first check, from a really fresh state) and
then runs each further check in a forked child that drops every `ditcache` module from `sys.modules` and
imports again: third-party packages stay loaded, but the package itself is initialised from scratch in the
order under test, which is all an import cycle of the package depends on.
"""

import importlib.util
import json
import pkgutil
import subprocess
import sys

import pytest

import ditcache

FIRST_IMPORTS = (
    "ditcache.calibration",
    "ditcache.calibration.mixcache",
    "ditcache.calibration.omnicache",
    "ditcache.policies.mixcache",
    "ditcache.numerics",
)

DRIVER = r"""
import importlib, json, os, sys, traceback

checks = json.loads(sys.argv[1])


def run(order):
    for name in order:
        importlib.import_module(name)


def purge():
    for name in [m for m in sys.modules if m == "ditcache" or m.startswith("ditcache.")]:
        del sys.modules[name]


results = {}
label, order = checks[0]
try:
    run(order)
    results[label] = None
except BaseException:
    results[label] = traceback.format_exc()
for label, order in checks[1:]:
    if not hasattr(os, "fork"):
        purge()
        try:
            run(order)
            results[label] = None
        except BaseException:
            results[label] = traceback.format_exc()
        continue
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        purge()
        try:
            run(order)
            error = ""
        except BaseException:
            error = traceback.format_exc()
        with os.fdopen(write, "w") as out:
            out.write(error)
        os._exit(1 if error else 0)
    os.close(write)
    with os.fdopen(read) as inp:
        error = inp.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    results[label] = error or (f"child exited with {code}" if code else None)
print(json.dumps(results))
sys.exit(1 if any(results.values()) else 0)
"""


# Modules that need an optional extra, with the package that extra installs: checked only where it is installed.
OPTIONAL = {"ditcache.kernels.triton_ops": "triton"}


def public_modules() -> list[str]:
    names = ["ditcache"]
    for info in pkgutil.walk_packages(ditcache.__path__, prefix="ditcache."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        extra = OPTIONAL.get(info.name)
        if extra is None or importlib.util.find_spec(extra) is not None:
            names.append(info.name)
    return sorted(names)


def test_public_modules_are_found():
    names = public_modules()
    for name in ("ditcache.numerics", "ditcache.cli", "ditcache.policies.omnicache_trajectory", *FIRST_IMPORTS):
        assert name in names


def test_every_module_imports_in_any_order():
    modules = public_modules()
    checks = [("sorted", modules), ("reversed", modules[::-1])]
    checks += [(f"first {name}", [name]) for name in FIRST_IMPORTS]
    command = [sys.executable, "-c", DRIVER, json.dumps(checks)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"import driver exited with {proc.returncode} and no result:\n{proc.stderr}")
    failures = {label: error for label, error in results.items() if error}
    assert set(results) == {label for label, _ in checks}
    assert not failures and proc.returncode == 0, "\n\n".join(
        [f"[{label}]\n{error}" for label, error in failures.items()] + [f"stderr:\n{proc.stderr}"]
    )
