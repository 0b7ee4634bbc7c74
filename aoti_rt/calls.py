"""What a method's call must look like, checked before AOTI runs, and what it returns.

A :class:`CallSignature` is built once per method from its manifest entry (each tensor
input's name, dtype, shape and ``torch.export.Dim`` range, the non-tensor inputs export fixed,
the exported call structure) and the ``.so``'s input and output counts. :meth:`~CallSignature.flatten`
turns ``(*args, **kwargs)`` into the flat tensors AOTI's Run takes: the common call (as many
tensors as inputs, positionally, each of the exported dtype, device and static shape) costs a
loop of identity and equality tests; anything else takes the slow path, which places keywords,
flattens the pytree, checks fixed values and ranges, and says what is wrong in an
:class:`~aoti_rt.errors.InputError`. :attr:`~CallSignature.outputs` rebuilds what the
exported program returns from Run's flat outputs.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable

from .abi import SharedObject, first_run
from .bundle import InputSpec, MethodSpec
from .errors import BundleError, InputError


class CallSignature:
    """One method's inputs and outputs, as exported (see the module's docstring).

    Who checks what: a bundle's manifest states every input's dtype, shape and ranges, which
    are checked here, and the ``.so``'s own checks stay on behind them (the manifest is not
    trusted to describe the .so); a bundle compiled with the ``.so``'s lower bounds on
    dynamic sizes (inductor's 2 where export proved 1) is refused sizes below them here, as an
    InputError, never by AOTI. A stock ``.so`` whose wrapper source stated its checks
    (:mod:`aoti_rt.input_checks`) is checked here entirely, strides included, and its own
    checks are off (they would refuse a size 1 that torch's loader runs); one without such a
    record is checked for device only and its own checks are on.

    Args:
        name: the method's name, for messages.
        spec: its manifest entry (``spec.inputs`` empty: a stock artifact that records no
            input checks).
        n_in, n_out: the ``.so``'s tensor input and output counts.
        device: the device it runs on, as torch spells it.
        so: the opened ``.so`` (its own checks are set here, and bundles' lower bounds read
            from it); None: neither.
        stock: ``spec`` describes a stock artifact (a ``.pt2`` or a bare ``.so``), not a
            bundle: its in_spec may have non-tensor leaves it does not describe, which are
            dropped as torch's own loader drops them.

    Raises:
        BundleError: a recorded call structure does not have the ``.so``'s number of tensors.
    """

    def __init__(self, name: str, spec: MethodSpec, n_in: int, n_out: int, device: str,
                 so: SharedObject | None = None, stock: bool = False):
        import torch
        from torch.utils import _pytree as pytree

        self.name = name
        self.spec = spec
        self.device = device
        self._n_in = n_in
        # a stock record of another input count than the .so's is not used (its .so checks)
        self._inputs = inputs = spec.inputs if not stock or len(spec.inputs) == n_in else []
        #: whether the .so's own input checks run (see the class's docstring)
        self.so_checks = not (stock and inputs and all(i.stride is not None for i in inputs))
        if so is not None:
            so.checks_wanted = self.so_checks
        n_fixed = len(spec.fixed_inputs)
        self._in_spec = _load_spec(spec.in_spec, n_in + n_fixed, f"method {name!r}: in_spec", loose=stock)
        #: a stock in_spec with leaves it does not describe: non-tensors there are dropped
        self._loose = self._in_spec is not None and self._in_spec.num_leaves != n_in + n_fixed
        out_spec = _load_spec(spec.out_spec, n_out, f"method {name!r}: out_spec")
        self._flat_in = self._in_spec is None or \
            self._in_spec == pytree.tree_flatten((tuple(range(n_in)), {}))[1]
        #: Run's flat output tensors -> what the exported program returns
        self.outputs: Callable[[list], Any]
        if out_spec is None:
            self.outputs = operator.itemgetter(0) if n_out == 1 else tuple
        elif out_spec == pytree.tree_flatten(tuple(range(n_out)))[1]:
            self.outputs = tuple
        elif n_out == 1 and out_spec == pytree.tree_flatten(0)[1]:
            self.outputs = operator.itemgetter(0)
        else:
            self.outputs = lambda tensors: pytree.tree_unflatten(tensors, out_spec)
        self._tdevice = torch.device(device)
        self._typed = bool(inputs)
        self._dtypes = [getattr(torch, i.dtype) for i in inputs]
        self._shapes = [tuple(i.shape) for i in inputs]
        self._static = [None not in sh for sh in self._shapes]
        # what the fast path compares a tensor's shape with: never equal for a dynamic input,
        # which takes the slow path (its ranges)
        self._fast_shapes = [sh if st else None for sh, st in zip(self._shapes, self._static)]
        # per input: the strides its layout must have where that is not "contiguous" (None)
        self._layouts: list[tuple | None] = []
        for i in inputs:
            if i.stride is not None:
                fixed = None not in i.shape and tuple(i.stride) == _contiguous(i.shape)
                self._layouts.append(None if fixed else tuple(i.stride))
            else:
                self._layouts.append(None)
        # a bundle .so compiled with a lower bound above the manifest's range: (input, dim) -> it
        self._floors: dict[tuple[int, int], int] = {}
        if so is not None and not stock and any(r is not None and r.min < 2 for i in inputs for r in i.dims or ()):
            from .input_checks import so_lower_bounds

            self._floors = {k: 2 for k in so_lower_bounds(so.path)}
        self._Tensor = torch.Tensor
        # the slow path's signature: fixed (non-tensor) inputs among the flattened call, and
        # the names by which keyword arguments find their places
        self._fixed = [(f.index, f.name, f.value) for f in spec.fixed_inputs]
        fixed_at = {f.index for f in spec.fixed_inputs}
        n_leaves = self._in_spec.num_leaves if self._loose else n_in + len(self._fixed)
        self._tensor_at = [k for k in range(n_leaves) if k not in fixed_at]
        leaf_names: list[str | None] = [None] * n_leaves
        for k, f in zip(self._tensor_at, inputs if not self._loose else ()):
            leaf_names[k] = f.name
        for f in spec.fixed_inputs:
            leaf_names[f.index] = f.name
        self._arg_names, self._kw_names = _call_names(self._in_spec, leaf_names)
        # dynamic dimensions sharing a torch.export.Dim: (input, dim, range) per symbol
        self._linked: dict[str, list[tuple[int, int, Any]]] = {}
        for i, inp in enumerate(inputs):
            for d, r in enumerate(inp.dims or ()):
                if r is not None and r.symbol:
                    self._linked.setdefault(r.symbol, []).append((i, d, r))
        self._linked = {k: v for k, v in self._linked.items() if len(v) > 1}
        if self._linked:       # only such methods pay for the check (an instance attribute wins)
            self.flatten = self._flatten_linked
        self._grad_warned = False

    def flatten(self, args: tuple, kwargs: dict) -> list | tuple:
        """The call as the tensors Run takes, each checked (InputError says what is wrong), a
        non-contiguous one copied to the contiguous layout the kernels were compiled for."""
        if not kwargs and self._flat_in and len(args) == self._n_in:
            leaves = args
        else:
            leaves = self._flatten_slow(args, kwargs)
        tensor, device, dtypes, shapes, typed, layouts = \
            self._Tensor, self._tdevice, self._dtypes, self._fast_shapes, self._typed, self._layouts
        for i, t in enumerate(leaves):
            if not isinstance(t, tensor):
                raise InputError(f"method {self.name!r}: input {i} must be a torch.Tensor, "
                                 f"got {type(t).__name__}")
            if not typed:
                if t.device != device:
                    raise InputError(f"method {self.name!r}: input {i} is on {t.device}, the model runs "
                                     f"on {self.device}; move it with .to({self.device!r})")
            elif (t.device != device or t.dtype is not dtypes[i] or t.shape != shapes[i]
                    or t.requires_grad):
                u = self._check_input(i, t, self._inputs[i])
                if u is not t:
                    if not isinstance(leaves, list):
                        leaves = list(leaves)
                    leaves[i] = u
                continue
            elif layouts[i] is not None:
                u = self._lay_out(i, t, layouts[i])
                if u is not t:
                    if not isinstance(leaves, list):
                        leaves = list(leaves)
                    leaves[i] = u
                continue
            if not t.is_contiguous():
                # generated kernels index inputs with the contiguous strides they were compiled
                # for: a transposed, sliced or expanded input is copied to that layout first
                if not isinstance(leaves, list):
                    leaves = list(leaves)
                leaves[i] = t.contiguous()
        return leaves

    def _lay_out(self, i: int, t, want: tuple):
        """``t`` with the strides a stock .so was compiled for (``want``, None: symbolic):
        itself where its strides agree (a size-1 dimension's never matters to the kernels, whose
        checks are off), a contiguous copy where the contiguous layout agrees, else a copy in
        the stated layout; InputError where symbolic strides leave that layout unknown."""
        have = t.stride()
        if all(w is None or w == h or n <= 1 for w, h, n in zip(want, have, t.shape)):
            return t
        canon = _contiguous(t.shape)
        if all(w is None or w == c or n <= 1 for w, c, n in zip(want, canon, t.shape)):
            return t.contiguous()
        if None not in want:
            import torch

            return torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device).copy_(t)
        shown = ["*" if w is None else w for w in want]
        raise InputError(f"method {self.name!r}: input {i} ({self._inputs[i].name}) has strides {list(have)}; "
                         f"its .so was compiled for strides {shown}: pass a tensor with that layout")

    def _flatten_linked(self, args: tuple, kwargs: dict) -> list | tuple:
        """:meth:`flatten`, then the sizes of dimensions exported with one Dim must agree."""
        leaves = CallSignature.flatten(self, args, kwargs)
        self._check_linked(leaves)
        return leaves

    def _flatten_slow(self, args: tuple, kwargs: dict) -> list:
        """Keyword arguments put in their places, the call flattened and checked against the
        exported structure, fixed (non-tensor) inputs checked and dropped: the tensor inputs."""
        from torch.utils import _pytree as pytree

        if kwargs or self._kw_names:
            args, kwargs = self._place_keywords(args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if len(leaves) != len(self._tensor_at) + len(self._fixed) or (self._in_spec is not None
                                                                       and spec != self._in_spec):
            fixed = f" and {len(self._fixed)} fixed" if self._fixed else ""
            want = f"; call it as {_describe_call(self._in_spec, self._arg_names)}" if self._in_spec else ""
            raise InputError(f"method {self.name!r} takes {self._n_in} tensor inputs{fixed}, got {len(leaves)} "
                             f"as {_describe_call(spec)}{want}")
        if self._loose:
            return self._drop_untyped(leaves)
        if not self._fixed:
            return leaves
        for k, name, value in self._fixed:
            self._check_fixed(name, value, leaves[k])
        return [leaves[k] for k in self._tensor_at]

    def _drop_untyped(self, leaves: list) -> list:
        """A stock call whose non-tensor inputs are not recorded: fixed ones checked, the
        others dropped, as torch's own loader drops them (the value export fixed is not
        known, so any is taken and the .so computes what it was compiled for); the tensors
        left must be as many as the .so takes."""
        fixed = {k: (name, value) for k, name, value in self._fixed}
        out = []
        for k, v in enumerate(leaves):
            if k in fixed:
                name, value = fixed[k]
                self._check_fixed(name, value, v)
            elif isinstance(v, self._Tensor):
                out.append(v)
        if len(out) != self._n_in:
            raise InputError(f"method {self.name!r} takes {self._n_in} tensor inputs, got {len(out)} tensors "
                             f"among {len(leaves)} inputs; pass a tensor for each of its tensor inputs")
        return out

    def _check_fixed(self, name: str, value: Any, v: Any) -> None:
        if not (v is value or (type(v) is type(value) or type(value) is float and type(v) is int)
                and v == value):
            raise InputError(f"method {self.name!r}: input {name!r} was fixed to {value!r} when the "
                             f"method was exported (export specialises non-tensor inputs), got {v!r:.80}; "
                             f"pass {value!r}, or export and compile the method again for this value")

    def _place_keywords(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` as exported: a keyword naming a positional input goes to its
        place, the exported keyword inputs in their exported order. InputError names unknown,
        repeated and missing inputs."""
        names, kw_names = self._arg_names, self._kw_names
        if names is None:
            raise InputError(f"method {self.name!r} does not record its call structure; pass its inputs "
                             f"positionally")
        if len(args) > len(names):
            by_kw = f"; pass {_name_list(kw_names)} by keyword" if kw_names else ""
            raise InputError(f"method {self.name!r} takes {len(names)} positional inputs "
                             f"({_name_list(names)}), got {len(args)}{by_kw}")
        slots: list[Any] = list(args) + [_MISSING] * (len(names) - len(args))
        placed: dict[str, Any] = {}
        unknown = []
        for key, v in kwargs.items():
            if key in kw_names:
                placed[key] = v
            elif key in names:
                j = names.index(key)
                if j < len(args):
                    raise InputError(f"method {self.name!r} got input {key!r} twice: as positional "
                                     f"input {j} and as a keyword")
                slots[j] = v
            else:
                unknown.append(key)
        if unknown:
            nested = " (nested inputs, shown as #N, are passed positionally)" if None in names else ""
            raise InputError(f"method {self.name!r} has no input named {', '.join(map(repr, unknown))}; its "
                             f"inputs are {_name_list(names + kw_names)}{nested}")
        missing = [_name_list([n], j) for j, (n, v) in enumerate(zip(names, slots)) if v is _MISSING]
        missing += [repr(k) for k in kw_names if k not in placed]
        if missing:
            raise InputError(f"method {self.name!r} is missing input{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)}")
        return tuple(slots), {k: placed[k] for k in kw_names}

    def _check_input(self, i: int, t, spec: InputSpec):
        """The slow path of the input check: find what is wrong and say it; else ``t`` laid
        out as the .so takes it (see :meth:`flatten`)."""
        if t.device != self._tdevice:
            raise InputError(f"method {self.name!r}: input {i} ({spec.name}) is on {t.device}, "
                             f"the model runs on {self.device}; move it with .to({self.device!r})")
        if t.dtype != self._dtypes[i]:
            raise InputError(f"method {self.name!r}: input {i} ({spec.name}) must be {spec.dtype}, "
                             f"got {str(t.dtype).removeprefix('torch.')}")
        if t.dim() != len(spec.shape) or any(s is not None and s != d for s, d in zip(spec.shape, t.shape)):
            shape = ["*" if s is None else s for s in spec.shape]
            raise InputError(f"method {self.name!r}: input {i} ({spec.name}) must have shape {shape}, "
                             f"got {list(t.shape)}")
        for d, r in enumerate(spec.dims or ()):
            if r is not None and not _in_range(t.shape[d], r):
                raise InputError(f"method {self.name!r}: input {i} ({spec.name}) has size {t.shape[d]} in "
                                 f"dimension {d}; it was exported for {_describe_range(r)} "
                                 f"(torch.export.Dim): pass a size in that range, or export with a wider Dim")
            floor = self._floors.get((i, d))
            if floor is not None and t.shape[d] < floor:
                raise InputError(f"method {self.name!r}: input {i} ({spec.name}) has size {t.shape[d]} in "
                                 f"dimension {d}, which its export allows, but its .so was compiled to refuse "
                                 f"sizes below {floor} there (an older aoti_rt compiled bundles with inductor's "
                                 f"lower bounds); compile the bundle again with this aoti_rt to call it so")
        if t.requires_grad and not self._grad_warned:
            import torch

            if torch.is_grad_enabled():
                self._grad_warned = True
                warnings.warn(f"method {self.name!r}: input {i} ({spec.name}) requires grad, but an AOTI method "
                              f"has no autograd: its outputs never require grad and backward() cannot reach "
                              f"the inputs (warned once per method); call it under torch.no_grad() or pass "
                              f".detach()ed inputs", stacklevel=5 if self._linked else 4)
        if self._layouts[i] is not None:
            return self._lay_out(i, t, self._layouts[i])
        if not t.is_contiguous():
            return t.contiguous()
        if self.so_checks and 1 in t.shape:
            # torch calls a tensor contiguous whatever a size-1 dimension's stride is; the .so's
            # check does not: a dynamic size 1 (the common batch) gets the canonical one
            canon = _contiguous(t.shape)
            if t.stride() != canon:
                return t.as_strided(t.shape, canon)
        return t

    def _check_linked(self, leaves) -> None:
        """Dimensions exported with one Dim must agree: ``(size - min) // step`` is equal."""
        for links in self._linked.values():
            i0, d0, r0 = links[0]
            k = (leaves[i0].shape[d0] - r0.min) // r0.step
            for i, d, r in links[1:]:
                want = r.min + k * r.step
                if leaves[i].shape[d] != want:
                    a, b = self._inputs[i0].name, self._inputs[i].name
                    raise InputError(f"method {self.name!r}: input {i} ({b}) has size {leaves[i].shape[d]} in "
                                     f"dimension {d}, but input {i0} ({a}) has {leaves[i0].shape[d0]} in dimension "
                                     f"{d0} and both were exported with one torch.export.Dim, which makes it "
                                     f"{want}; pass sizes that agree")


def _load_spec(text: str | None, leaves: int, what: str, loose: bool = False):
    """A call spec from the manifest, which must have as many leaves as the .so has tensors
    (a spec with another count would make every call fail, or unflatten garbage); ``loose``
    (a stock .so's own spec): at least as many, the others non-tensor inputs export fixed."""
    if not text:
        return None
    from torch.utils import _pytree as pytree

    try:
        spec = pytree.treespec_loads(text)
    except Exception:  # noqa: BLE001 - a spec this torch cannot read: run unstructured
        return None
    if spec.num_leaves != leaves and not (loose and spec.num_leaves > leaves):
        raise BundleError(f"{what} has {spec.num_leaves} leaves but the .so has {leaves} tensors; "
                          f"the bundle is inconsistent, recompile it")
    return spec


_MISSING = object()


def _call_names(in_spec, leaf_names: list[str | None]) -> tuple[list[str | None] | None, list[str]]:
    """From an exported in_spec ``(args, kwargs)``: each positional input's name (None for a
    nested one, which has no name of its own) and the exported keyword inputs, in order. None
    for the positional names where the spec is not of that form (a stock .so's may not be)."""
    if in_spec is None or in_spec.num_children != 2:
        return None, []
    args_spec, kw_spec = _children(in_spec)
    if args_spec.type is not tuple or kw_spec.type is not dict:
        return None, []
    names: list[str | None] = []
    at = 0
    for child in _children(args_spec):
        names.append(leaf_names[at] if child.is_leaf() and at < len(leaf_names) else None)
        at += child.num_leaves
    return names, [str(k) for k in kw_spec.context]


def _children(spec) -> list:
    """A TreeSpec's children (``children()``; ``children_specs``, deprecated in torch 2.13, before it)."""
    kids = getattr(spec, "children", None)
    return list(kids()) if callable(kids) else list(spec.children_specs)


def _name_list(names: list[str | None], first: int = 0) -> str:
    return ", ".join(repr(n) if n is not None else f"#{first + j}" for j, n in enumerate(names))


def _describe_call(spec, names: list[str | None] | None = None) -> str:
    """A call structure in words: ``('x', 'pos', cache=(tensor, tensor))``, not a TreeSpec dump."""
    if spec.type is tuple and spec.num_children == 2 and _children(spec)[1].type is dict:
        args_spec, kw_spec = _children(spec)
        parts = [(f"{names[j]!r}" if names and j < len(names) and names[j] is not None and child.is_leaf()
                  else _describe_tree(child)) for j, child in enumerate(_children(args_spec))]
        parts += [f"{k}={_describe_tree(c)}" for k, c in zip(kw_spec.context, _children(kw_spec))]
        return f"({', '.join(parts)})"
    return _describe_tree(spec)


def _describe_tree(spec) -> str:
    if spec.is_leaf():
        return "input"
    kids = [_describe_tree(c) for c in _children(spec)]
    if spec.type is tuple:
        return f"({', '.join(kids)}{',' if len(kids) == 1 else ''})"
    if spec.type is list:
        return f"[{', '.join(kids)}]"
    if spec.type is dict:
        return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(spec.context, kids)) + "}"
    return f"{getattr(spec.type, '__name__', spec.type)}({', '.join(kids)})"


def _contiguous(shape) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``shape`` (a size-1 or 0 dimension
    takes the stride of the next one's extent, at least 1)."""
    out, at = [], 1
    for n in reversed(tuple(shape)):
        out.append(at)
        at *= max(n, 1)
    return tuple(reversed(out))


class FirstRun:
    """Stands for a .so's :class:`~aoti_rt._bind.ModelABI` in a method's calls: its first
    ``run`` is the .so's first Run, which fixes the .so's own input checks
    (:func:`aoti_rt.abi.first_run`); every later one is the ABI's own ``run``."""

    def __init__(self, so: SharedObject):
        self._so = so
        self._abi = so.abi
        if so.input_checks is not None:
            self.run = so.abi.run

    def run(self, *args: Any) -> Any:
        out = first_run(self._so, lambda: self._abi.run(*args))
        self.run = self._abi.run           # the checks are fixed: straight to the .so from now
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._abi, name)


def _in_range(size: int, r) -> bool:
    return size >= r.min and (r.max is None or size <= r.max) and (size - r.min) % r.step == 0


def _describe_range(r) -> str:
    top = "" if r.max is None else f"{r.max}"
    text = f"sizes {r.min}..{top}" if r.max is not None else f"sizes >= {r.min}"
    return text if r.step == 1 else f"{text} in steps of {r.step} ({r.min} + {r.step}k)"
