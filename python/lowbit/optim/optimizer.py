"""The optimizer machinery of lowbit.optim: bitsandbytes' GlobalOptimManager interface, and the base
class that keeps 8-bit blockwise (or fp32) states in bitsandbytes' state layout and runs one fused
op call per batch of parameters (torch.ops.lowbit.optimizer_update_8bit_blockwise / _32bit).

State of a parameter p (bitsandbytes' keys, so checkpoints move between the two libraries):

    step     int, the number of updates applied to p
    state1   first state (Adam's m, momentum, RMSprop's mean square, Lion's m): uint8 codes of
             p's shape for 8-bit states, or fp32 of p's shape
    state2   second state (Adam's v), two-state optimizers only
    qmap1    8-bit only: fp32 [256], the signed dynamic map (state1 codes index it)
    qmap2    8-bit only: fp32 [256], the unsigned dynamic map (state2 is never negative)
    absmax1  8-bit only: fp32 [ceil(numel / 256)], the scale of each block of 256 codes
    absmax2  8-bit only, two-state optimizers
    gnorm_vec  fp32 [100], only with percentile_clipping < 100: the last squared gradient norms

Parameters with fewer than min_8bit_size elements keep fp32 states (as in bitsandbytes).

Gradients holding NaN or Inf: the parameter is left alone for that step (parameter, states and
step count unchanged) and a RuntimeWarning names it. Other parameters are updated as usual. On CUDA
the check runs on the device and step() does not wait for it (no host synchronisation per step):
the flags are copied back asynchronously and read at the start of the next step() or in
state_dict() / load_state_dict(), which is when the warning is raised and the step count of a
skipped parameter is taken back (before any further update uses it).
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections import defaultdict
from copy import deepcopy
from itertools import chain

import torch

from lowbit._codes import create_dynamic_map

BLOCKSIZE = 256
# bitsandbytes' Optimizer8bit.state_dict() moves these into a nested dict under this key so that
# FSDP does not try to gather them; lowbit writes and reads the same layout.
WRAPPED_KEY = "__bnb_optimizer_quant_state__"
QUANT_KEYS = (
    "qmap1",
    "qmap2",
    "max1",
    "max2",
    "new_max1",
    "new_max2",
    "state1",
    "state2",
    "gnorm_vec",
    "absmax1",
    "absmax2",
    "unorm_vec",
)
_GOLDEN = 0x9E3779B9


class GlobalOptimManager:
    """Per-parameter optimizer settings, with bitsandbytes' interface.

    Typical use keeps an embedding's states in 32 bits::

        mng = lowbit.optim.GlobalOptimManager.get_instance()
        mng.register_parameters(model.parameters())
        mng.override_config(model.emb.weight, "optim_bits", 32)
        opt = lowbit.optim.Adam8bit(model.parameters())

    or, from a module's constructor, ``mng.register_module_override(self, "weight",
    {"optim_bits": 32})``. Overridable keys: lr, betas, eps, weight_decay, optim_bits,
    min_8bit_size, percentile_clipping, skip_zeros.
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    def initialize(self):
        self.pid2config = {}
        self.index2config = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple = []

    @classmethod
    def get_instance(cls):
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params):
        """Remember the (group, index) of parameters that already have an override."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(gi, pi)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None):
        """Override settings of `parameters` (a tensor or a list): one `key`/`value` or a dict."""
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if key is not None and value is not None:
            if key_value_dict is not None:
                raise ValueError("override_config: pass key and value, or key_value_dict, not both")
            key_value_dict = {key: value}
        if key_value_dict is None:
            raise ValueError("override_config: pass key and value, or key_value_dict")
        _check_override_keys(key_value_dict)
        for p in parameters:
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(self, module, param_name, config):
        """Override settings of `getattr(module, param_name)`, resolved at the first step."""
        _check_override_keys(config)
        # A weak reference: modules register themselves at construction (lowbit.nn.Embedding), and
        # a process-wide manager must not keep every such module alive.
        self.module_weight_config_triple.append((weakref.ref(module), param_name, config))


_OVERRIDABLE = {
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "optim_bits",
    "min_8bit_size",
    "percentile_clipping",
    "skip_zeros",
}


def _check_override_keys(config: dict) -> None:
    unknown = set(config) - _OVERRIDABLE
    if unknown:
        raise ValueError(
            f"unknown optimizer setting(s) {sorted(unknown)}; overridable: {sorted(_OVERRIDABLE)}"
        )
    for key, value in config.items():
        _check_setting("GlobalOptimManager", key, value)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)  # numpy scalars too


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_setting(where: str, key: str, value) -> None:
    """TypeError / ValueError naming `key` when `value` is not a valid setting (constructor
    arguments and manager overrides alike: an override is applied without further checks)."""
    if key in ("lr", "eps", "weight_decay"):
        if not _is_number(value):
            raise TypeError(f"{where}: {key} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
    elif key == "betas":
        # Every kernel reads two: (beta1, beta2) for Adam and Lion, (momentum, 0) for SGD and
        # (alpha, 0) for RMSprop. A shorter tuple must not run with beta2 silently 0.
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"{where}: betas must be two numbers (beta1, beta2), got {value!r}")
        for i, b in enumerate(value):
            if not _is_number(b):
                raise TypeError(f"{where}: betas[{i}] must be a number, got {b!r}")
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {b!r}")
    elif key == "optim_bits":
        if value not in (8, 32) or isinstance(value, bool):
            raise ValueError(f"{where}: optim_bits must be 8 or 32, got {value!r}")
    elif key == "min_8bit_size":
        if not _is_int(value):
            raise TypeError(f"{where}: min_8bit_size must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{where}: min_8bit_size must be >= 0, got {value!r}")
    elif key == "percentile_clipping":
        if not _is_int(value):
            raise TypeError(f"{where}: percentile_clipping must be an int, got {value!r}")
        if not 1 <= value <= 100:
            raise ValueError(f"{where}: percentile_clipping must be in [1, 100], got {value!r}")


class _Args:
    """bitsandbytes' MockArgs: the settings that are not per parameter group."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _dynamic_maps(device):
    return create_dynamic_map(signed=True).to(device), create_dynamic_map(signed=False).to(device)


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of lowbit's optimizers (bitsandbytes' Optimizer1State / Optimizer2State).

    Subclasses set `_kind` (the kernel's optimizer name) and `_two_states`.
    """

    _kind = "adam"
    _two_states = True
    _bits = None  # None: optim_bits decides; 8 or 32: fixed by the class (X8bit, X32bit)

    def __init__(
        self,
        params,
        defaults: dict,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        stochastic_rounding: bool = False,
    ):
        name = type(self).__name__
        for key in ("lr", "eps", "weight_decay"):
            _check_setting(name, key, defaults[key])
        betas = defaults["betas"]
        if isinstance(betas, str):  # bitsandbytes accepts '(0.9, 0.999)' from command lines
            betas = tuple(float(b) for b in betas.strip("() ").split(","))
            defaults["betas"] = betas
        _check_setting(name, "betas", betas)
        if not block_wise:
            raise ValueError(
                f"{name}: block_wise=False is not supported; lowbit keeps 8-bit states blockwise "
                "(256 values per fp32 absmax), as bitsandbytes does by default"
            )
        if max_unorm != 0.0:
            raise ValueError(
                f"{name}: max_unorm (LAMB/LARS trust ratio) is not supported, got {max_unorm}"
            )
        if is_paged:
            warnings.warn(
                f"{name}: lowbit has no paged optimizers; the states are ordinary device tensors",
                stacklevel=3,
            )
        super().__init__(params, defaults)
        if args is None:
            args = _Args(
                optim_bits=optim_bits,
                min_8bit_size=min_8bit_size,
                percentile_clipping=percentile_clipping,
                max_unorm=max_unorm,
                skip_zeros=skip_zeros,
            )
        for key, default in (
            ("percentile_clipping", 100),
            ("skip_zeros", False),
            ("min_8bit_size", 4096),
        ):
            if not hasattr(args, key):
                setattr(args, key, default)
        for key in ("optim_bits", "min_8bit_size", "percentile_clipping"):
            _check_setting(name, key, getattr(args, key))
        self.args = args
        self.stochastic_rounding = bool(stochastic_rounding)
        self.mng = GlobalOptimManager.get_instance()
        self.initialized = False
        self.name2qmap = {}
        # Stochastic rounding draws its per-step seeds from one draw of torch's generator here, so a
        # run is reproducible under torch.manual_seed without consuming random numbers per step.
        self._sr_base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if stochastic_rounding else -1
        self._sr_calls = 0
        # CUDA: the `applied` flags of the last step, on their way to the host (_defer_skipped).
        self._pending_skipped = None

    # ---- configuration -------------------------------------------------------------------------

    def _fixed_bits(self, optim_bits):
        if self._bits is None:
            return optim_bits
        if optim_bits != 32:
            # bitsandbytes' X8bit/X32bit take optim_bits only for signature compatibility.
            raise ValueError(
                f"{type(self).__name__} always keeps {self._bits}-bit states; leave optim_bits at its "
                f"default (32), got {optim_bits!r}"
            )
        return self._bits

    def check_overrides(self):
        self._module_overrides = {}
        triples = self.mng.module_weight_config_triple
        triples[:] = [t for t in triples if t[0]() is not None]  # drop modules that are gone
        for module_ref, attr, config in triples:
            module = module_ref()
            if module is None:
                continue
            target = getattr(module, attr, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(
                    f"register_module_override: {type(module).__name__}.{attr} is not a tensor"
                )
            # Kept on this optimizer, not in the manager's process-wide tables: those are keyed by
            # id() and (group, index), which a later optimizer's parameters can reuse. This one
            # holds its parameters, so their ids stay theirs.
            for group in self.param_groups:
                for p in group["params"]:
                    if p is target:
                        self._module_overrides[id(p)] = config

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict:
        config = {k: group[k] for k in ("betas", "eps", "weight_decay", "lr")}
        for k in ("optim_bits", "min_8bit_size", "percentile_clipping", "skip_zeros"):
            config[k] = getattr(self.args, k)
        if (gindex, pindex) in self.mng.index2config:
            config.update(self.mng.index2config[(gindex, pindex)])
        p = self.param_groups[gindex]["params"][pindex]
        if id(p) in self.mng.pid2config:
            config.update(self.mng.pid2config[id(p)])
        config.update(getattr(self, "_module_overrides", {}).get(id(p), {}))
        return config

    # ---- state ---------------------------------------------------------------------------------

    def _qmaps(self, device):
        key = str(device)
        if key not in self.name2qmap:
            self.name2qmap[key] = _dynamic_maps(device)
        return self.name2qmap[key]

    @torch.no_grad()
    def init_state(self, group, p, gindex, pindex):
        config = self.get_config(gindex, pindex, group)
        eight = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
        state = self.state[p]
        state["step"] = 0
        dtype = torch.uint8 if eight else torch.float32
        state["state1"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if self._two_states:
            state["state2"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.contiguous_format
            )
        if eight:
            qmap1, qmap2 = self._qmaps(p.device)
            blocks = -(-p.numel() // BLOCKSIZE)
            state["qmap1"] = qmap1
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            if self._two_states:
                state["qmap2"] = qmap2
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=p.device)

    def _gnorm_scale(self, state, grad, step: int, percentile: int) -> float:
        """Percentile clipping: scale the gradient down to the `percentile`-th percentile of the
        last min(step, 100) gradient norms when its own norm is above it (bitsandbytes' rule, over
        the recorded history only, so the first steps are not clipped by the zero-filled vector)."""
        vec = state.setdefault(
            "gnorm_vec", torch.zeros(100, dtype=torch.float32, device=grad.device)
        )
        vec[step % 100] = grad.float().pow(2).sum()
        filled = vec[: min(step, 100)] if step < 100 else vec
        vals = torch.sort(filled).values
        k = min(len(vals) - 1, (percentile * len(vals)) // 100)
        # One device-to-host copy for both norms (the scale is a kernel argument, so one sync per
        # parameter is needed; bitsandbytes has the same one).
        clip_sq, current_sq = torch.stack((vals[k], vec[step % 100])).tolist()
        clip, current = math.sqrt(clip_sq), math.sqrt(current_sq)
        return clip / current if current > clip else 1.0

    def _sr_seed(self) -> int:
        if not self.stochastic_rounding:
            return -1
        self._sr_calls += 1
        return (self._sr_base + self._sr_calls * _GOLDEN) & 0x7FFFFFFF

    # ---- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The previous step's non-finite flags first: a skipped parameter's step count is taken
        # back before this step increments it.
        self._resolve_skipped()
        if not self.initialized:
            self.check_overrides()
            self.initialized = True
        # Parameters that share every setting, the step count and the state format go to the op in
        # one call (one multi-tensor launch on CUDA; on CPU one op call instead of many).
        batches = defaultdict(list)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self.init_state(group, p, gi, pi)
                # States come from init_state or load_state_dict (which checks them); the op
                # checks them again in C++, so no per-parameter Python check here.
                config = self.get_config(gi, pi, group)
                state["step"] += 1
                step = state["step"]
                gnorm_scale = 1.0
                if config["percentile_clipping"] < 100:
                    gnorm_scale = self._gnorm_scale(
                        state, p.grad, step, config["percentile_clipping"]
                    )
                eight = state["state1"].dtype == torch.uint8
                key = (
                    eight,
                    step,
                    p.device,
                    float(config["lr"]),
                    tuple(float(b) for b in config["betas"]),
                    float(config["eps"]),
                    float(config["weight_decay"]),
                    bool(config["skip_zeros"]),
                    gnorm_scale,
                    id(state.get("qmap1")),
                    id(state.get("qmap2")),
                )
                batches[key].append((gi, pi, p, state))
        results = []
        for key, items in batches.items():
            eight, step, _, lr, betas, eps, wd, skip_zeros, gnorm_scale, _, _ = key
            b1 = betas[0] if len(betas) > 0 else 0.0
            b2 = betas[1] if len(betas) > 1 else 0.0
            ps = [p if p.is_contiguous() else _make_contiguous(p) for _, _, p, _ in items]
            gs = [p.grad for _, _, p, _ in items]
            st = [s for _, _, _, s in items]
            two = self._two_states
            common = dict(
                beta1=b1,
                beta2=b2,
                eps=eps,
                step=step,
                lr=lr,
                weight_decay=wd,
                gnorm_scale=gnorm_scale,
                skip_zeros=skip_zeros,
                sr_seed=self._sr_seed(),
            )
            if eight:
                applied = torch.ops.lowbit.optimizer_update_8bit_blockwise(
                    self._kind,
                    gs,
                    ps,
                    [s["state1"] for s in st],
                    [s["state2"] for s in st] if two else [],
                    [s["absmax1"] for s in st],
                    [s["absmax2"] for s in st] if two else [],
                    st[0]["qmap1"],
                    st[0]["qmap2"] if two else None,
                    **common,
                )
            else:
                applied = torch.ops.lowbit.optimizer_update_32bit(
                    self._kind,
                    gs,
                    ps,
                    [s["state1"] for s in st],
                    [s["state2"] for s in st] if two else [],
                    **common,
                )
            results.append((items, applied))
        if results:
            self._defer_skipped(results)
        return loss

    def _defer_skipped(self, results) -> None:
        """Start the read-back of the ops' `applied` flags. CPU flags are read at once. CUDA flags
        go to pinned host memory with a non-blocking copy on the op's stream, and an event marks
        their arrival: step() returns without waiting for the GPU (a synchronisation per step would
        stall the host for the whole update and serialise the next forward pass behind it), and
        the flags are read at the next step() or state_dict() (_resolve_skipped). Flags of several
        devices are copied one tensor at a time (torch.cat cannot mix devices)."""
        pending, events = [], {}
        for items, applied in results:
            if applied.is_cuda:
                host = applied.to("cpu", non_blocking=True)  # pinned output, stream-ordered
                events[applied.device] = None
                pending.append((items, host))
            else:
                pending.append((items, applied))
        for dev in events:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            events[dev] = ev
        self._pending_skipped = (pending, list(events.values()))
        if not events:
            self._resolve_skipped()

    def _resolve_skipped(self) -> None:
        """Read the flags of the last step (waiting for their copies only, not for later work):
        warn about each parameter whose gradient held NaN/Inf and take back its step count."""
        pending = getattr(self, "_pending_skipped", None)
        if pending is None:
            return
        self._pending_skipped = None
        results, events = pending
        for ev in events:
            ev.synchronize()
        for items, flags in results:
            if bool(flags.all()):
                continue
            for k, (gi, pi, p, state) in enumerate(items):
                if bool(flags[k]):
                    continue
                state["step"] -= 1
                warnings.warn(
                    f"lowbit.optim.{type(self).__name__}: the gradient of parameter "
                    f"{pi} of param_groups[{gi}] (shape {list(p.shape)}, "
                    f"{p.dtype}) holds NaN or Inf; its update was skipped (parameter, "
                    "optimizer state and step count unchanged)",
                    RuntimeWarning,
                    stacklevel=3,
                )

    # ---- state dict ----------------------------------------------------------------------------

    def state_dict(self):
        """torch's state dict with bitsandbytes' layout: the quantization tensors of each state
        nested under '__bnb_optimizer_quant_state__' (bitsandbytes loads it as is)."""
        self._resolve_skipped()  # step counts of parameters skipped on CUDA, taken back
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
        for st in sd["state"].values():
            if isinstance(st, dict):
                quant = {k: st.pop(k) for k in [k for k in st if k in QUANT_KEYS]}
                if quant:
                    st[WRAPPED_KEY] = quant
        return sd

    def load_state_dict(self, state_dict, move_to_device: bool = True):
        """Load a state dict of lowbit's or bitsandbytes' optimizers (nested or flat layout).

        Raises ValueError when groups or parameter counts differ, or when a parameter's state lacks
        an entry its format needs or holds one of the wrong dtype or size. State tensors keep their
        dtype (uint8 codes, fp32 values) and move to the parameter's device.
        """
        name = type(self).__name__
        self._resolve_skipped()  # warn about the last step now; its states are being replaced
        state_dict = deepcopy(state_dict)
        if (
            not isinstance(state_dict, dict)
            or "state" not in state_dict
            or "param_groups" not in state_dict
        ):
            raise ValueError(
                f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'"
            )
        for st in state_dict["state"].values():
            if isinstance(st, dict) and WRAPPED_KEY in st:
                st.update(st.pop(WRAPPED_KEY))
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer {len(groups)}"
            )
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: parameter group {gi} has {len(sg['params'])} "
                    f"parameters in the state dict and {len(g['params'])} in the optimizer"
                )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        where = {}
        for gi, g in enumerate(saved_groups):
            for pi, pid in enumerate(g["params"]):
                where[pid] = (gi, pi)
        state = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(
                    f"{name}.load_state_dict: the state dict has a state for parameter id {k!r}, "
                    "which no parameter group lists"
                )
            p = id_map[k]
            if not isinstance(v, dict):
                raise ValueError(
                    f"{name}.load_state_dict: the state of parameter {k!r} is not a dict"
                )
            if "step" not in v:
                raise ValueError(
                    f"{name}.load_state_dict: the state of parameter {where[k]} lacks 'step'"
                )
            v = dict(v)
            v["step"] = int(v["step"].item() if isinstance(v["step"], torch.Tensor) else v["step"])
            _check_state_tensors(name + ".load_state_dict", self._two_states, v, p, where[k])
            shared = dict(zip(("qmap1", "qmap2"), self._qmaps(p.device)))
            for key, t in v.items():
                if isinstance(t, torch.Tensor) and move_to_device:
                    t = t.to(p.device)
                    if key in ("state1", "state2"):
                        t = t.reshape(p.shape).contiguous()
                    # The standard maps become the optimizer's shared tensors again, so that
                    # parameters batch into one op call.
                    if key in shared and torch.equal(t, shared[key]):
                        t = shared[key]
                    v[key] = t
            state[p] = v
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = dict(sg)
            ng["params"] = g["params"]
            new_groups.append(ng)
        self.__setstate__({"state": state, "param_groups": new_groups})
        self.initialized = False


def _make_contiguous(p: torch.Tensor) -> torch.Tensor:
    """The fused op updates parameters in place, so each must be contiguous: re-lay p's storage
    (as bitsandbytes does with p.data = p.data.contiguous()) and its gradient's."""
    p.data = p.data.contiguous()
    return p


def _check_state_tensors(where: str, two: bool, st: dict, p: torch.Tensor, index) -> None:
    """The state entries a parameter's format needs, with their dtypes and sizes."""
    name = f"{where}: the state of parameter {index[1]} of param_groups[{index[0]}] (shape {list(p.shape)})"
    n = p.numel()
    needed = ("state1", "state2") if two else ("state1",)
    for key in needed:
        if key not in st:
            raise ValueError(f"{name} lacks '{key}'")
        t = st[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: '{key}' must be a tensor, got {type(t).__name__}")
        if t.dtype not in (torch.uint8, torch.float32):
            raise ValueError(
                f"{name}: '{key}' must be uint8 (8-bit) or float32 (32-bit), got {t.dtype}"
            )
        if t.numel() != n:
            raise ValueError(f"{name}: '{key}' holds {t.numel()} values, the parameter {n}")
    if two and st["state1"].dtype != st["state2"].dtype:
        raise ValueError(
            f"{name}: 'state1' is {st['state1'].dtype} but 'state2' is {st['state2'].dtype}; "
            "both states must be 8-bit or both 32-bit"
        )
    if st["state1"].dtype != torch.uint8:
        return
    blocks = -(-n // BLOCKSIZE)
    for i in (1, 2) if two else (1,):
        for key, size in ((f"qmap{i}", 256), (f"absmax{i}", blocks)):
            if key not in st:
                raise ValueError(
                    f"{name} lacks '{key}' (8-bit states need state{i}, qmap{i} and absmax{i})"
                )
            t = st[key]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise ValueError(f"{name}: '{key}' must be a float32 tensor")
            if t.numel() != size:
                raise ValueError(
                    f"{name}: '{key}' holds {t.numel()} values, expected {size}"
                    + (f" (ceil({n} / {BLOCKSIZE}) blocks)" if key.startswith("absmax") else "")
                )
