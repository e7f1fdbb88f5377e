"""Compiling a loop's C entry with numba (machine_code.py keeps and links the object code).

The entry is a `cfunc` over raw pointers that calls the njit loop with arrays made over them
(`numba.carray`): its object code holds the loop and everything the loop calls, linked in."""

from __future__ import annotations

import numba
from llvmlite import binding as llvm
from numba import types as nt

from .machine_code import Unavailable, array_type

_NUMBA = {"u16": nt.uint16, "u32": nt.uint32, "u64": nt.uint64, "i64": nt.int64, "f32": nt.float32}


def _array(t: str):
    base, _ = t[:-1].split("[")
    return nt.Array(_NUMBA[base], array_type(t)[1], "C")


def numba_signature(types: tuple[str, ...]) -> tuple:
    """The loop's argument types as numba's."""
    return tuple(_array(t) if array_type(t) else _NUMBA[t] for t in types)


def _wrapper_source(types: tuple[str, ...], result: str | None, name: str) -> tuple[str, list]:
    """The entry's source and its C argument types."""
    params, args, c = [], [], []
    for k, t in enumerate(types):
        a = array_type(t)
        if a is None:
            params.append(f"s{k}")
            args.append(f"s{k}")
            c.append(_NUMBA[t])
            continue
        extents = [f"n{k}_{d}" for d in range(a[1])]
        params += [f"p{k}", *extents]
        args.append(f"carray(p{k}, ({', '.join(extents)},))")
        c += [nt.CPointer(_NUMBA[t[:3]]), *[nt.int64] * a[1]]
    call = f"loop({', '.join(args)})"
    if result == "i64,i64":
        params += ["r", "rn"]
        c += [nt.CPointer(nt.int64), nt.int64]
        body = ["out = carray(r, (rn,))", f"out[0], out[1] = {call}"]
    elif result == "bool":
        body = [f"return 1 if {call} else 0"]
    elif result == "i64":
        body = [f"return {call}"]
    else:
        body = [call]
    lines = [f"def {name}({', '.join(params)}):", *(f"    {b}" for b in body)]
    return "\n".join(lines) + "\n", c


def compile_entry(loop, types: tuple[str, ...], result: str | None, name: str) -> tuple[dict, bytes]:
    """(header, object code) of the C entry `name` of the njit function `loop` with this signature;
    Unavailable where numba cannot make it."""
    source, c = _wrapper_source(types, result, name)
    returns = {None: nt.void, "i64,i64": nt.void, "bool": nt.uint8, "i64": nt.int64}[result]
    namespace = {"loop": loop, "carray": numba.carray}
    try:
        exec(compile(source, f"<entry {name}>", "exec"), namespace)
        compiled = numba.cfunc(returns(*c), nogil=True)(namespace[name])
        library = compiled._library
        code = library.serialize_using_object_code()[2][0]
        module = llvm.parse_assembly(library.get_llvm_str())
    except Exception as error:  # noqa: BLE001 - numba's private parts, or a loop it cannot compile so
        raise Unavailable(f"numba could not compile the entry: {error}") from error
    needs = sorted({f.name for f in module.functions if f.is_declaration}
                   | {g.name for g in module.global_variables if g.is_declaration})
    return {"symbol": compiled.native_name, "needs": [n for n in needs if not n.startswith("llvm.")]}, code
