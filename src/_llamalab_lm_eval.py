"""Make `lm_eval --model llamalab` work with the stock lm-evaluation-harness command line.

Released lm-evaluation-harness versions (0.4.x, 0.5.0.dev1) resolve `--model NAME` against their own
registry and have no plugin discovery (entry-point discovery was only proposed later upstream, see
EleutherAI/lm-evaluation-harness#3282 and #4013). So llamalab installs a one-line `.pth` file that imports
this module at interpreter start-up. It is deliberately tiny and imports nothing heavy: it puts an import
hook on `sys.meta_path` that waits until `lm_eval.models` has been imported (that is when lm-eval fills
its model registry) and then adds `llamalab` to the registry as a lazy `module:Class` path, so that nothing
of llamalab or torch is imported until lm-eval actually asks for the model.

Newer lm-eval versions with entry-point discovery find the same class through the `lm_eval.models` entry
point declared in pyproject.toml; registering twice under one name is harmless.
"""

from __future__ import annotations

import sys

TARGET = "llamalab.eval.lm_eval_adapter:LlamalabLM"
_WATCHED = "lm_eval.models"


def register(registry_module=None) -> None:
    """Add `llamalab` to lm-eval's model registry (no-op if it is there already)."""
    if registry_module is None:
        import lm_eval.api.registry as registry_module
    registry = registry_module.model_registry
    if "llamalab" not in registry:
        registry.register("llamalab", target=TARGET)


class _Loader:  # the importlib Loader protocol; no importlib.abc import at start-up
    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        # Put the real loader back first, so the package looks exactly as if imported without us.
        module.__loader__ = self.inner
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        self.inner.exec_module(module)
        try:
            register()
        except Exception as e:  # a broken hook must never break lm-eval itself
            print(f"llamalab: could not register the lm-eval model: {e}", file=sys.stderr)


class _Finder:  # the importlib MetaPathFinder protocol
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the hook on `sys.meta_path` (or register at once if lm-eval's models are already imported)."""
    if _WATCHED in sys.modules:
        register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
