"""The one way jaxllm changes tpu-inference: replace a name in a module, once the module is imported.

Every change is a `Patch`: a module, a name in it (`hbm_usage_bytes`, or
`TPUModelRunner._modify_prev_results` for a class attribute), a function that
turns the original into its replacement, and why. `install(patch)`:
- waits until the module is imported (an import hook), so installing imports
  nothing, and a module that binds the name at import time already sees ours;
- replaces the name in the module, and in every module that copied it with
  `from module import name` before the patch ran (not where it is defined);
- remembers the original and its replacement in one registry per process:
  installing the same patch again is a no-op.
`explain()` lists every patch of this process and whether it is in place.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import inspect
import sys
from typing import Any, Callable

from vllm.logger import init_logger

logger = init_logger("vllm.jaxllm")

@dataclasses.dataclass(frozen=True)
class Patch:
    module: str                      # e.g. "tpu_inference.utils"
    name: str                        # "attr", or "Class.attr"
    why: str                         # one line, shown by explain()
    replace: Callable[[Any], Any]    # original -> replacement

    @property
    def target(self) -> str:
        return f"{self.module}.{self.name}"


_installed: dict[str, Patch] = {}   # target -> patch, in the order installed
_originals: dict[str, Any] = {}     # target -> what the patch replaced, once applied
_replacements: dict[str, Any] = {}  # target -> what replaced it
_waiting: dict[str, list[Patch]] = {}  # module -> patches to apply when it is imported


def install(patch: Patch) -> None:
    """Apply `patch` now if its module is imported, else as soon as it is; idempotent."""
    if patch.target in _installed:
        return
    _installed[patch.target] = patch
    module = sys.modules.get(patch.module)
    if module is not None:
        _apply(patch, module)
        return
    _waiting.setdefault(patch.module, []).append(patch)
    if not any(isinstance(finder, _ApplyAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ApplyAfterImport())


def original(target: str) -> Any:
    """What the patch of `target` ("module.name") replaced; KeyError if it is not applied."""
    return _originals[target]


def installed() -> list[Patch]:
    return list(_installed.values())


def is_applied(patch: Patch) -> bool:
    module = sys.modules.get(patch.module)
    if module is None:
        return False
    owner, attr = _owner(module, patch.name)
    # Statically: a class's classmethod comes back bound (a new object) through getattr.
    return patch.target in _replacements and inspect.getattr_static(owner, attr, None) is _replacements[patch.target]


def explain() -> str:
    """Every name jaxllm replaces in this process: applied, or waiting for its module."""
    if not _installed:
        return "jaxllm changes nothing in this process (the plugin has not registered)."
    width = max(len(patch.target) for patch in _installed.values())
    lines = [f"jaxllm changes {len(_installed)} names in tpu-inference in this process:"]
    for patch in _installed.values():
        if is_applied(patch):
            state = "applied"
        elif patch.module in sys.modules:
            state = "LOST"  # applied, then rebound by someone else
        else:
            state = "waiting"  # for its module to be imported
        lines.append(f"  {state:8} {patch.target:{width}}  {patch.why}")
    return "\n".join(lines)


def _owner(module, name: str):
    """(object holding the attribute, attribute name) for "attr" or "Class.attr"."""
    *path, attr = name.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def _apply(patch: Patch, module) -> None:
    owner, attr = _owner(module, patch.name)
    before = getattr(owner, attr)
    replacement = patch.replace(before)
    setattr(owner, attr, replacement)
    _originals[patch.target], _replacements[patch.target] = before, replacement
    if owner is module:  # rebind earlier `from module import name` copies, not the definition itself
        home = getattr(before, "__module__", None)
        for other in list(sys.modules.values()):
            if other is not module and getattr(other, "__name__", None) != home and getattr(other, attr, None) is before:
                setattr(other, attr, replacement)
    logger.debug("jaxllm: patched %s: %s", patch.target, patch.why)


class _ApplyAfterImport(importlib.abc.MetaPathFinder):
    """Finds a waiting module with the other finders and applies its patches once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ApplyingLoader(spec.loader)
                return spec
        return None


class _ApplyingLoader(importlib.abc.Loader):

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, attr):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace
        for patch in _waiting.pop(module.__name__, ()):
            _apply(patch, module)
