"""Reductions' first passes inside the native loops that compute their inputs (native_regions, taps).

The loop that computes a reduction's input, the root, hands the values of every input of the
reduction to the reducer's loops block by block as it computes them: l1_ratio(x, keep_random(x))
so reads x's inputs once, not twice, and makes one pass, not three. The other inputs must be values
of the root's region.

Several reductions of one tensor whose roots read the same loads (ties' top-k of each fine-tune's
delta from one base, dare's l1 sums) take their first pass together: one loop computes all of their
roots chunk by chunk and hands each its values, reading the shared loads once per chunk instead of
once per reduction. (A top-k select picks its bracket from its first chunk's histogram and then
notes that chunk: the loop runs over the first chunk twice.) That loop stores nothing: nothing
reads the sum, and storing it cost ties' joint pass 10-15% of its time. Each reducer sees the same
values in the same order as alone, so its result is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Node, walk
from .ops import OPS
from .schedule import is_leaf, region


@dataclass(eq=False)  # members are told apart by identity (their taps hold tensors)
class Member:
    """One reduction's first pass: its inputs and reducer, the root whose loop computes them, that
    root's region (steps) and the taps for it."""

    inputs: tuple[Node, ...]
    reducer: object
    root: Node | None = None
    steps: tuple = ()
    taps: tuple = ()


def siblings(evaluator, node: Node) -> list[Node]:
    """The other reductions of the tensor to take their first pass with `node`'s: side by side
    (keep_loads), of ops that tap, not computed yet, whose inputs' regions end in loads, constants
    and cached values only, and that read a load of `node`'s region."""
    if not evaluator.keep_loads or not _taps(node):
        return []
    stops = frozenset(evaluator.cache)
    loads = {s.node for a in inputs_of(node) for s in region(a, stops) if s.node.op == "load"}
    found = []
    for n in dict.fromkeys(walk(evaluator.tp.graph)):
        if n is node or n in evaluator.cache or OPS.get(n.op) is None or OPS[n.op].kind != "reduce" or not _taps(n):
            continue
        leaves = [s.node for a in inputs_of(n) for s in region(a, stops) if not s.inputs]
        if all(leaf.op in ("const", "load") or leaf in evaluator.cache for leaf in leaves) and loads & set(leaves):
            found.append(n)
    return found


def _taps(node: Node) -> bool:
    return hasattr(OPS[node.op].kernel, "taps")


def inputs_of(node: Node) -> tuple[Node, ...]:
    n_in, _ = OPS[node.op].layout(len(node.args))
    return tuple(node.args[:n_in])


def plan(evaluator, native, inputs, reducer) -> Member:
    """The member for a reduction; its root is None where its first pass cannot be tapped (the
    reducer has no taps, no input is a root whose region holds the others)."""
    member = Member(tuple(inputs), reducer)
    taps = reducer.taps(0) if native is not None and hasattr(reducer, "taps") else None
    if not taps:
        return member
    for root in inputs:
        if is_leaf(root) or root in evaluator.cache:
            continue
        steps = evaluator.region_of(root)
        index = {s.node: i for i, s in enumerate(steps)}
        if all(a in index for a in inputs):
            member.root, member.steps = root, steps
            member.taps = tuple((index[a], loop, arrays, constants)
                                for a, (loop, arrays, constants) in zip(inputs, taps))
            return member
    return member


def first_passes(evaluator, members: list[Member]) -> list[bool]:
    """Pass 0 of each member inside native loops; for each, whether it was (False: nothing done).

    The chunks of two or more members run in one loop over the region of all their roots (or,
    where that loop is not there yet, in their own); the first chunk too, where all of them are
    selects (run twice: _note_first_chunk) or none is (sums). Otherwise, and for a member alone,
    a member's first chunk runs in its own loop (the reducer's `tapped_chunk`, where it has one,
    then gets the root's values of that chunk). A first chunk waits for its loop where another
    thread is loading it; a member whose loop refuses it is left out. The root is kept whole when
    it fits the budget, as keep_inputs would, except with keep_loads (the loads are kept:
    shared_loads) or several members. A chunk a loop leaves out (a short last one) is evaluated
    eagerly."""
    native = getattr(evaluator.fuser, "native", None)
    active = [m for m in members if m.root is not None]
    if not active:
        return [False] * len(members)
    whole = None
    nbytes = evaluator.rows * evaluator.row_size * 4
    if len(active) == 1 and not evaluator.keep_loads and evaluator.cached_bytes + nbytes <= evaluator.budget:
        whole = evaluator.empty_float32(evaluator.shape)
    scratch = None
    joint = None  # (steps, taps) of the loop over every active member's root
    # A select picks its bracket from the histogram of its first chunk, then notes that chunk's
    # entries in the bracket (tapped_chunk, after its own loop); sums need neither. Where every
    # member is a select, the joint loop runs over the first chunk twice, to bin it and to note it
    # (_note_first_chunk); where none is, it takes the first chunk as any other; else each member's
    # first chunk runs in its own loop.
    selects = sum(hasattr(m.reducer, "tapped_chunk") for m in active)
    first_alone = 0 < selects < len(active)
    for r0, r1 in evaluator.chunks():
        if whole is not None:
            part = whole[r0:r1]
        else:  # the roots' chunks are not kept: one buffer takes them all (fresh memory for each
            # chunk's values cost the loop of ties' first pass 0.5 ns per entry in page faults)
            if scratch is None:
                scratch = evaluator.empty_float32((min(evaluator.rows, evaluator.chunk_rows()) * evaluator.row_size,))
            part = scratch[:(r1 - r0) * evaluator.row_size].reshape((r1 - r0,) + tuple(evaluator.shape[1:]))
        if len(active) > 1 and (r0 > 0 or not first_alone):
            if joint is None:
                joint = _joint(evaluator, active)
            if native.rows_of(evaluator, joint[0], r0, r1, taps=joint[1], taps_only=True, wait=r0 == 0) is not None:
                if r0 == 0 and selects:
                    _note_first_chunk(evaluator, native, joint, active, r1)
                continue
        for m in list(active):
            # the first chunk waits for a loop another thread is linking or building: left eager, the
            # whole first pass would be
            value = native.rows_of(evaluator, m.steps, r0, r1, part, m.taps, wait=r0 == 0)
            if value is None and r0 == 0:
                active.remove(m)
                continue
            if value is None:
                value = evaluator.rows_of(m.root, r0, r1, part)
                m.reducer.update(0, *[evaluator._as_tensor(value if a is m.root else evaluator.rows_of(a, r0, r1),
                                                           r1 - r0) for a in m.inputs])
            elif r0 == 0 and hasattr(m.reducer, "tapped_chunk"):
                m.reducer.tapped_chunk(value)
            if whole is not None and value is not part:
                part[...] = value
        if not active:
            break
    if whole is not None and active:
        evaluator.cache[active[0].root] = whole
        evaluator.cached_bytes += nbytes
    return [m in active for m in members]


def _note_first_chunk(evaluator, native, joint: tuple, members: list[Member], r1: int) -> None:
    """After the joint loop binned the first chunk (rows [0, r1)) for selects: each picks its bracket,
    and the loop runs over the chunk again to note the entries in it (counting those above the
    bracket too, which the histogram holds already: that count is put back). Each select ends with
    the histogram and notes that its own first chunk would have given it (tapped_chunk)."""
    restore = [m.reducer.bracket_binned(r1 * evaluator.row_size) for m in members]
    if native.rows_of(evaluator, joint[0], 0, r1, taps=joint[1], taps_only=True, wait=True) is None:
        for m in members:  # not expected: the loop just ran over this chunk; the notes made eagerly
            m.reducer.note_chunk(evaluator._as_tensor(evaluator.rows_of(m.root, 0, r1), r1))
    for put_back in restore:
        put_back()


def _joint(evaluator, members: list[Member]) -> tuple[tuple, tuple]:
    """The region of the sum of the members' roots (its loop computes each root on the way), and
    every member's taps on it."""
    steps = evaluator.region_of(Node("sum", [m.root for m in members]))
    index = {s.node: i for i, s in enumerate(steps)}
    taps = tuple((index[m.steps[i].node], loop, arrays, constants)
                 for m in members for i, loop, arrays, constants in m.taps)
    return steps, taps
