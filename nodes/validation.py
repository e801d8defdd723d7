"""Input checks every node of the pack gets before it runs, from its schema (the registry applies them).

ComfyUI checks a FLOAT against the widget's min / max, which a NaN passes (every comparison with NaN is false),
and a linked FLOAT is not checked at all; a NaN beta or lambda would then run to an all-NaN image.
"""
from __future__ import annotations

import functools
import inspect
import math

from comfy_api.latest import io


class NonFiniteInputError(ValueError):
    """A FLOAT input is NaN or infinite; the message names the node and the input."""


def float_input_names(node_cls) -> tuple[str, ...]:
    return tuple(i.id for i in node_cls.define_schema().inputs if isinstance(i, io.Float.Input))


def require_finite_floats(node_cls, values: dict, names) -> None:
    for name in names:
        value = values.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            schema = node_cls.define_schema()
            raise NonFiniteInputError(f"{schema.display_name or schema.node_id} ({schema.node_id}): the input "
                                      f"'{name}' is {value}; it must be a finite number")


def _call_arguments(signature: inspect.Signature, cls, args, kwargs) -> dict:
    """The node's inputs by name, however execute was called (ComfyUI passes keywords; tests may pass positions)."""
    try:
        bound = signature.bind_partial(cls, *args, **kwargs).arguments
    except TypeError:  # the call itself is wrong; execute will say so
        return dict(kwargs)
    extra = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return {**bound, **(bound.get(extra[0], {}) if extra else {})}


def check_finite_floats(node_cls: type) -> type:
    """Wrap a V3 node's execute so that a NaN / inf in any of its FLOAT inputs stops it with an error naming the
    node and the input.  Idempotent; works for sync and async execute."""
    if vars(node_cls).get("_checks_finite_floats"):
        return node_cls
    execute = inspect.getattr_static(node_cls, "execute").__func__
    signature = inspect.signature(execute)
    names: list[tuple[str, ...]] = []    # the FLOAT inputs, read from the schema at the first call

    def check(cls, args, kwargs):
        if not names:
            names.append(float_input_names(cls))
        require_finite_floats(cls, _call_arguments(signature, cls, args, kwargs), names[0])

    if inspect.iscoroutinefunction(execute):
        @functools.wraps(execute)
        async def checked(cls, *args, **kwargs):
            check(cls, args, kwargs)
            return await execute(cls, *args, **kwargs)
    else:
        @functools.wraps(execute)
        def checked(cls, *args, **kwargs):
            check(cls, args, kwargs)
            return execute(cls, *args, **kwargs)

    node_cls.execute = classmethod(checked)
    node_cls._checks_finite_floats = True
    return node_cls
