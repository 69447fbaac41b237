"""The plain values of a pickle (dicts, lists, tuples, strings, numbers), found by walking
its opcode stream with a symbolic stack: nothing is imported, called or built but those
containers. Every object the pickle would construct (a tensor, a class instance, anything
behind GLOBAL, REDUCE, BUILD or a persistent id) is `OPAQUE`.

For bookkeeping a framework keeps inside a pickle next to its tensors (Lightning's
ModelCheckpoint state: which files are its best k). The memo is followed (torch.save
memoizes every string and refers back to it with BINGET), so a path written once and named
again by reference reads the same both times.
"""

from __future__ import annotations

from typing import Any


class _Opaque:
    __slots__ = ()

    def __repr__(self) -> str:
        return "OPAQUE"


OPAQUE: Any = _Opaque()

_PUSH_ARG = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
             "BINSTRING", "STRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8",
             "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "BINFLOAT", "FLOAT"}
_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_POP_PUSH_OPAQUE = {"REDUCE": 2, "STACK_GLOBAL": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "BINPERSID": 1}
_PUSH_OPAQUE = {"GLOBAL", "PERSID", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER"}


class NotPlain(ValueError):
    """The stream is broken, or larger than the caller allows."""


def plain_values(data: bytes, max_ops: int = 2_000_000) -> Any:
    """The pickle's top object with every container it holds; OPAQUE for anything else.
    Raises NotPlain for a broken stream or one of more than max_ops opcodes."""
    import pickletools  # at the first such read: most daemons never make one

    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        if not marks:
            raise NotPlain("pickle: MARK expected")
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def pop(n: int = 1) -> list[Any]:
        if len(stack) < n:
            raise NotPlain("pickle: stack underflow")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(data)):
            if count >= max_ops:
                raise NotPlain(f"pickle: more than {max_ops} opcodes")
            name = op.name
            if name in ("PROTO", "FRAME", "READONLY_BUFFER"):
                continue
            if name in _PUSH_ARG:
                stack.append(arg)
            elif name in _CONST:
                stack.append(_CONST[name])
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append({} if name == "EMPTY_DICT" else () if name == "EMPTY_TUPLE" else [])
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(tuple(pop(int(name[-1]))))
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "DICT":
                items = pop_mark()
                stack.append(_pairs({}, items))
            elif name == "APPEND":
                (v,) = pop()
                if stack and isinstance(stack[-1], list):
                    stack[-1].append(v)
            elif name in ("APPENDS", "ADDITEMS"):
                items = pop_mark()
                if stack and isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif name == "SETITEM":
                k, v = pop(2)
                if stack and isinstance(stack[-1], dict):
                    _pairs(stack[-1], [k, v])
            elif name == "SETITEMS":
                items = pop_mark()
                if stack and isinstance(stack[-1], dict):
                    _pairs(stack[-1], items)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                if not stack:
                    raise NotPlain("pickle: PUT on an empty stack")
                memo[arg if isinstance(arg, int) else -1] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise NotPlain("pickle: MEMOIZE on an empty stack")
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo.get(arg if isinstance(arg, int) else -1, OPAQUE))
            elif name in _POP_PUSH_OPAQUE:
                pop(_POP_PUSH_OPAQUE[name])
                stack.append(OPAQUE)
            elif name in _PUSH_OPAQUE:
                stack.append(OPAQUE)
            elif name in ("OBJ", "INST", "FROZENSET"):
                pop_mark()
                stack.append(OPAQUE)
            elif name == "BUILD":
                pop()                       # the state; the object stays what it was
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1] if stack else OPAQUE)
            elif name == "STOP":
                if len(stack) != 1:
                    raise NotPlain("pickle: STOP with a stack of other than one item")
                return stack[0]
            else:
                raise NotPlain(f"pickle: opcode {name} not understood")
    except NotPlain:
        raise
    except ValueError as e:          # pickletools: a truncated or corrupt stream
        raise NotPlain(f"pickle: opcode stream broken ({e})") from None
    raise NotPlain("pickle: no STOP")


def _pairs(d: dict, items: list[Any]) -> dict:
    if len(items) % 2:
        raise NotPlain("pickle: odd number of items for a dict")
    for k, v in zip(items[::2], items[1::2]):
        if isinstance(k, (str, int, float, bytes, bool)) or k is None:
            d[k] = v
    return d
