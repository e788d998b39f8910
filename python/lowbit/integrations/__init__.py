"""Integrations with other libraries: the Transformers quantizer ("lowbit") and PEFT support.

`import lowbit` must stay fast and must work without Transformers, yet
`AutoModel*.from_pretrained(..., quantization_config=LowbitConfig(...))` and loading a saved
lowbit checkpoint must find the "lowbit" quantizer whatever the import order. So registration is
deferred: done at once when Transformers' quantizer registry is already imported, otherwise by a
one-shot import hook that fires right after `transformers.quantizers.auto` has executed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_AUTO = "transformers.quantizers.auto"
_registered = False


def register_transformers() -> None:
    """Register LowbitConfig and the "lowbit" quantizer with Transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from lowbit.integrations import transformers as hf

    hf.register()
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `transformers.quantizers.auto` through the other finders and wraps its loader so
    that registration runs as soon as the module body has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register_transformers()
            except Exception as e:  # a broken plug-in must never break `import transformers`
                msg = f"lowbit: could not register the Transformers quantizer: {e!r}"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def _register_if_available() -> None:
    """Called by `import lowbit`: costs a dictionary lookup, or one find_spec when Transformers
    has not been imported yet; never imports Transformers itself."""
    if _AUTO in sys.modules:
        register_transformers()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
