"""FLOPs a jitted step really executes on given inputs: its jaxpr run op by op, every loop for its real trips.

XLA's `cost_analysis()` counts each `while` body once, whatever its trip count (zero
included), and a `cond` as its dearest branch. Our model step is mostly loops whose
trip counts come from the batch (the portable attention's decode rows, query blocks and
KV blocks; the routed MoE's experts and chunks), so its compiled figure is neither a
bound nor an estimate of the work. `executed_flops(fn, *args)` evaluates `fn`'s jaxpr
with the actual arguments, one primitive at a time: loops run their real trips, `cond`
its taken branch, and each primitive's FLOPs are counted as XLA's cost analysis counts
them (a dot 2 x M x N x K, an elementwise op or a reduction one per element;
transcendentals apart). With every trip count at one and the dearest branch taken it
gives about what `cost_analysis()` gives (`static=True`, a check of the counting).

Collectives are evaluated for a one-device mesh (a psum over axes of size 1 is the
identity), which is what the benchmarks run.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import numpy as np
from jax.extend import core as jcore

_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "rsqrt",
                   "sqrt", "cbrt", "pow", "erf", "erfc", "erf_inv", "atan2", "asin", "acos", "atan", "sinh",
                   "cosh", "asinh", "acosh", "atanh", "lgamma", "digamma"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "rem", "max", "min", "neg", "abs", "sign", "floor", "ceil", "round",
                "select_n", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "clamp", "square",
                "integer_pow", "is_finite", "shift_left", "shift_right_logical", "shift_right_arithmetic",
                "nextafter", "add_any", "population_count", "clz"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor",
               "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_COLLECTIVES = {"psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "psum_scatter", "reduce_scatter"}


@dataclasses.dataclass
class Flops:
    """FLOPs counted by kind, and the dot FLOPs by source line of our code."""
    dot: float = 0.0
    other: float = 0.0           # elementwise and reductions
    transcendental: float = 0.0
    dot_by_line: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def flops(self) -> float:
        """What cost_analysis()["flops"] counts: dots, elementwise ops and reductions."""
        return self.dot + self.other


def executed_flops(fn, *args, static: bool = False, **kwargs) -> Flops:
    """Run `fn(*args, **kwargs)` (a jitted function or any traceable one) op by op and count its FLOPs.

    `static=True` counts as XLA's cost analysis does: each loop body once, a `cond`'s dearest branch.
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    counter = _Counter(static)
    counter.run(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves((args, kwargs)))
    return counter.flops


class _Counter:
    def __init__(self, static: bool):
        self.static = static
        self.flops = Flops()

    def run(self, jaxpr, consts, args):
        env = {}

        def read(v):
            return np.asarray(v.val) if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def closed(self, closed_jaxpr, args):
        return self.run(closed_jaxpr.jaxpr, closed_jaxpr.consts, args)

    def eqn(self, eqn, args):
        name, params = eqn.primitive.name, eqn.params
        if name == "while":
            return self.while_loop(params, args)
        if name == "cond":
            return self.cond(params, args)
        if name == "scan":
            return self.scan(params, args)
        if name in _COLLECTIVES:
            return self.collective(eqn, args)
        if name == "axis_index":
            return np.int32(0)
        sub = params.get("jaxpr", params.get("call_jaxpr", params.get("fun_jaxpr")))
        if sub is not None:
            if isinstance(sub, jcore.ClosedJaxpr):
                return self.closed(sub, args)
            return self.run(sub, (), args)
        if name in ("sharding_constraint", "mesh_cast", "reshard", "pvary", "optimization_barrier"):
            return list(args) if eqn.primitive.multiple_results else args[0]  # one device: nothing to move
        self.count(eqn, args)
        # Shardings inside shard_map name manual mesh axes that eager evaluation can't hold; one device.
        params = {k: None if k in ("sharding", "out_sharding") else v for k, v in params.items()}
        return eqn.primitive.bind(*args, **params)

    def count(self, eqn, args):
        name = eqn.primitive.name
        out = eqn.outvars[0].aval
        size = math.prod(getattr(out, "shape", ()))
        f = self.flops
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = args[0].shape
            flops = 2 * size * math.prod(lhs[d] for d in contract)
            f.dot += flops
            f.dot_by_line[_where(eqn)] += flops
        elif name in _TRANSCENDENTAL:
            f.transcendental += size
        elif name in _ELEMENTWISE:
            f.other += size
        elif name in _REDUCTIONS:
            f.other += math.prod(np.shape(args[0]))

    def while_loop(self, params, args):
        cn, bn = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts, carry = args[:cn], args[cn:cn + bn], list(args[cn + bn:])
        if self.static:  # one trip, as cost_analysis counts it
            self.closed(params["cond_jaxpr"], [*cond_consts, *carry])
            self.closed(params["body_jaxpr"], [*body_consts, *carry])
            return carry
        while bool(self.closed(params["cond_jaxpr"], [*cond_consts, *carry])[0]):
            carry = self.closed(params["body_jaxpr"], [*body_consts, *carry])
        return carry

    def cond(self, params, args):
        index, operands = args[0], args[1:]
        branches = params["branches"]
        if not self.static:
            return self.closed(branches[int(np.clip(int(index), 0, len(branches) - 1))], operands)
        # The dearest branch, as cost_analysis counts a conditional.
        best, outs = None, None
        for branch in branches:
            saved, self.flops = self.flops, Flops()
            result = self.closed(branch, operands)
            counted, self.flops = self.flops, saved
            if best is None or counted.flops > best.flops:
                best, outs = counted, result
        self.flops.dot += best.dot
        self.flops.other += best.other
        self.flops.transcendental += best.transcendental
        self.flops.dot_by_line.update(best.dot_by_line)
        return outs

    def scan(self, params, args):
        consts, carry, xs = (list(part) for part in params["ft_in"].update(args).unpack())
        ncarry, length = len(carry), params["length"]
        ys = []
        steps = range(length - 1, -1, -1) if params["reverse"] else range(length)
        for i in steps:
            outs = self.closed(params["jaxpr"], [*consts, *carry, *(x[i] for x in xs)])
            carry, y = outs[:ncarry], outs[ncarry:]
            ys.append(y)
            if self.static:
                break
        if self.static:
            ys = ys * length
        elif params["reverse"]:
            ys.reverse()
        stacked = [jax.numpy.stack(column) for column in zip(*ys)] if ys and ys[0] else \
            [jax.numpy.zeros((length, *v.aval.shape[1:]), v.aval.dtype) for v in params["jaxpr"].jaxpr.outvars[ncarry:]]
        return [*carry, *stacked]

    @staticmethod
    def collective(eqn, args):
        # One device: every mapped axis has size 1, so a reduction over it is the identity.
        if eqn.primitive.name in ("psum", "pmax", "pmin"):
            return list(args) if eqn.primitive.multiple_results else args[0]
        raise NotImplementedError(f"{eqn.primitive.name} is only counted on a one-device mesh")


def _where(eqn) -> str:
    """file:line of the innermost frame in jaxllm, for attributing dot FLOPs."""
    from jax._src import source_info_util

    frame = source_info_util.user_frame(eqn.source_info.traceback)
    if frame is None:
        return "?"
    path = frame.file_name
    if "/jaxllm/" in path:
        path = "jaxllm/" + path.split("/jaxllm/", 1)[1]
    return f"{path}:{frame.start_line}"
