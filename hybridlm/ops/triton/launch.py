"""A cheaper host path for launching our Triton kernels.

`kernel[grid](*args, **kwargs)` goes through Triton's `JITFunction.run` every time: it binds the arguments, builds a
specialisation key and an options string, looks the compiled kernel up, checks the kernel's globals and only then
calls the C launcher. With the thirty-odd arguments of the GDN kernels that costs tens of microseconds of host time a
launch, and a short prefill's forward is bound by it (benchmarks/NOTES.md, "host time").

`launch(kernel, grid, *args, **kwargs)` does the same launch. The first call of a kind goes through Triton (which
compiles or finds the kernel); its compiled kernel is kept under a key that is at least as fine as Triton's own
specialisation (each tensor's dtype and 16-byte alignment, each integer's class: 1, a multiple of 16, 32 or 64 bits;
constexprs and launch options by value), so later calls of that kind go to the C launcher directly. Anything this
path does not model (the interpreter, autotuned or hooked kernels, callable grids, launch hooks, argument types other
than tensors, ints, floats, bools and None) takes Triton's path unchanged; a launch with CPU tensors is never cached,
and the C launcher refuses one on every launch as Triton's path does. Should the C launcher refuse a cached launch's
arguments where Triton's path takes them (a Triton whose launcher changed), the process goes back to Triton's path
for good. `FAST_LAUNCH = False` (or HYBRIDLM_FAST_LAUNCH=0) turns it off.
"""
from __future__ import annotations

import os

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

FAST_LAUNCH = os.environ.get("HYBRIDLM_FAST_LAUNCH", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"

# id(kernel) -> (kernel, {(number of positional args, kwargs names): _Plan})
_PLANS: dict = {}
_OPTION_NAMES = frozenset(("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                           "launch_cooperative_grid", "launch_pdl", "debug"))


class _Unmodelled(Exception):
    """An argument of a type the cached path does not key (Triton's path takes the call)."""


def _other(value):
    """The key part of an argument that is neither an exact torch.Tensor nor an int (see _Plan's generated code)."""
    if value is None or value.__class__ is float:
        return value.__class__
    if value.__class__ is bool:
        return (bool, value)
    if isinstance(value, torch.Tensor):
        return (value.dtype, not value.data_ptr() & 15)
    raise _Unmodelled


class _Plan:
    """How one call shape (positional count, keyword names) of a kernel maps onto its parameters, with the compiled
    kernels seen for it by key. `keyed(args, kwargs)` returns (the full argument list in signature order, its key): a
    function generated for the shape, straight-line over the parameters, since a Python loop over fifty-odd
    arguments costs as much as Triton's own binding. A parameter's key part:
    - constexpr: its value;
    - tensor: (dtype, 16-byte aligned); not its device: Triton's C launcher refuses a pointer CUDA cannot reach
      (a CPU tensor) on every launch, so the cached path fails as Triton's does;
    - int: (== 1, a multiple of 16, fits 32 bits, >= 2**63), the classes Triton specialises and types on;
    - None, float: the type; bool: (bool, value); anything else is not modelled (_Unmodelled);
    then the launch options by value."""

    __slots__ = ("keyed", "compiled")

    def __init__(self, kernel, n_args: int, kw_names: tuple[str, ...]):
        params = kernel.params
        if n_args > len(params):
            raise TypeError(f"{kernel.__name__} takes {len(params)} arguments; got {n_args} positional")
        lines, parts, namespace = [], [], {"_T": torch.Tensor, "_other": _other}
        names = [f"a{p.num}" for p in params]
        if n_args:
            lines.append(f"    {', '.join(names[:n_args])}, = args")
        for p in params[n_args:]:
            if p.name in kw_names and p.name not in _OPTION_NAMES:
                lines.append(f"    a{p.num} = kwargs[{p.name!r}]")
            elif p.has_default:
                namespace[f"d{p.num}"] = p.default
                lines.append(f"    a{p.num} = d{p.num}")
            else:
                raise TypeError(f"{kernel.__name__}: missing argument {p.name!r}")
        for p, name in zip(params, names):
            if p.is_constexpr:
                parts.append(name)
            else:
                parts.append(f"(({name}.dtype, not {name}.data_ptr() & 15) if {name}.__class__ is _T "
                             f"else ({name} == 1, not {name} & 15, -2147483648 <= {name} <= 2147483647, "
                             f"{name} >= 9223372036854775808) if {name}.__class__ is int else _other({name}))")
        parts += [f"kwargs[{name!r}]" for name in kw_names if name in _OPTION_NAMES]
        source = ("def keyed(args, kwargs):\n" + "\n".join(lines) + "\n"
                  f"    return ({', '.join(names)},), ({', '.join(parts)},)\n")
        exec(compile(source, f"<hybridlm launch plan for {kernel.__name__}>", "exec"), namespace)
        self.keyed = namespace["keyed"]
        self.compiled: dict = {}


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's): such launches take Triton's path, which calls it. Triton 3.6 keeps
    an empty hook chain there by default."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True)))


def _slow(kernel, grid, args, kwargs):
    return kernel[grid](*args, **kwargs)


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, through the C launcher directly where this call's kind was seen before."""
    if not FAST_LAUNCH or not isinstance(kernel, triton.runtime.jit.JITFunction) or not isinstance(grid, tuple):
        return _slow(kernel, grid, args, kwargs)
    # (by id: hashing a JITFunction goes through its cache_key property; the entry holds the kernel, so its id is
    # never reused)
    entry = _PLANS.get(id(kernel))
    if entry is None:
        entry = _PLANS[id(kernel)] = (kernel, {})
    plans = entry[1]
    shape = (len(args), tuple(kwargs))
    plan = plans.get(shape)
    if plan is None:
        plan = plans[shape] = _Plan(kernel, len(args), shape[1])
    try:
        full, key = plan.keyed(args, kwargs)
    except _Unmodelled:
        return _slow(kernel, grid, args, kwargs)
    device = driver.active.get_current_device()
    key = (key, device)
    entry = plan.compiled.get(key)
    if entry is None:
        compiled = _slow(kernel, grid, args, kwargs)
        cacheable = compiled is not None and all(v.is_cuda for v in full if isinstance(v, torch.Tensor))
        if cacheable and not _hooked() and not getattr(kernel, "pre_run_hooks", ()):
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            # the globals the kernel read when it compiled: Triton refuses a launch where one has changed since
            plan.compiled[key] = (compiled, tuple(getattr(kernel, "used_global_vals", {}).items()))
        return compiled
    compiled, used_globals = entry
    if _hooked():
        return _slow(kernel, grid, args, kwargs)
    for (name, _), (val, globals_dict) in used_globals:
        if globals_dict.get(name, _MISSING) != val:
            return _slow(kernel, grid, args, kwargs)  # Triton raises its own error for this
    grid_0 = grid[0]
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    stream = driver.active.get_current_stream(device)
    try:
        compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *full)
    except TypeError:
        result = _slow(kernel, grid, args, kwargs)  # raises where the arguments are at fault
        _give_up()
        return result
    return compiled


def _give_up() -> None:
    """Triton's path took a launch the cached one could not make: this Triton's launcher differs from the one this
    path was written for (3.6-3.9), so every later launch goes through Triton."""
    global FAST_LAUNCH
    FAST_LAUNCH = False


_MISSING = object()
