"""Integrations with other libraries: the Transformers quantizer ("lowbit") and PEFT support.

`import lowbit` must stay fast and must work without Transformers, yet
`AutoModel*.from_pretrained(..., quantization_config=LowbitConfig(...))` and loading a saved
lowbit checkpoint must find the "lowbit" quantizer whatever the import order. So registration is
deferred: done at once when Transformers' quantizer registry is already imported, otherwise by a
one-shot import hook that fires right after `transformers.quantizers.auto` has executed. PEFT's
LoRA learns about LinearAffine layers the same way, right after `peft.tuners.lora.model` (see
lowbit.integrations.peft.install).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_AUTO = "transformers.quantizers.auto"
_PEFT_LORA = "peft.tuners.lora.model"
_registered = False


def register_transformers() -> None:
    """Register LowbitConfig and the "lowbit" quantizer with Transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from lowbit.integrations import transformers as hf

    hf.register()
    _registered = True


def register_peft() -> None:
    """Make PEFT's LoRA dispatcher wrap LinearAffine layers (idempotent)."""
    module = sys.modules.get(f"{__name__}.peft")
    if module is not None and not hasattr(module, "install"):
        # `import lowbit.integrations.peft` with PEFT not yet imported: that module's own imports
        # of peft fired the hook while it is half-initialised; its body ends with install().
        return
    from lowbit.integrations import peft

    peft.install()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds module `target` (`transformers.quantizers.auto` by default) through the other finders
    and wraps its loader so that `register` runs as soon as the module body has executed."""

    def __init__(self, target: str = _AUTO, register=register_transformers):
        self.target, self.register = target, register

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                self.register()
            except Exception as e:  # a broken plug-in must never break `import transformers`
                msg = f"lowbit: could not register with {self.target}: {e!r}"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def _register_if_available() -> None:
    """Called by `import lowbit`: costs a dictionary lookup, or one find_spec when Transformers
    has not been imported yet; never imports Transformers itself."""
    for target, package, register in (
        (_AUTO, "transformers", register_transformers),
        (_PEFT_LORA, "peft", register_peft),
    ):
        if target in sys.modules:
            register()
        elif importlib.util.find_spec(package) is not None:
            hooks = [f for f in sys.meta_path if isinstance(f, _RegisterAfterImport)]
            if not any(f.target == target for f in hooks):
                sys.meta_path.insert(0, _RegisterAfterImport(target, register))
