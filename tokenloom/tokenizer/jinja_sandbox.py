"""A Jinja sandbox on a time and size budget, for templates that are untrusted code.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python internals and from
mutating its inputs, but not from running for hours or building gigabytes. Here:

* unsafe attribute access (`x.__class__`) is an error, not a silently empty value;
* a deadline: every call, attribute and item access, operator, filter, test, loop iteration and
  output chunk checks the clock, so a loop that prints nothing still ends after `time_limit_s`
  (loops and `~` are routed through hooks by rewriting the parsed template);
* a size budget: every operation that can make text or lists much larger than its inputs
  (`*`, `+`, `~`, `**`, `%`, `join`, `indent`, `replace`, widths in formats, ...) is checked
  before it runs, so no string, list or number far larger than `max_chars` is ever built.

The environment is set up as transformers sets up chat templates (loop controls, its `tojson`,
`raise_exception`, `strftime_now`, a `namespace` and `dict` that expose no internals).
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from datetime import datetime
from itertools import islice

from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from tokenloom.errors import TokenloomError

MAX_OUTPUT_CHARS = 4_000_000  # the rendered prompt, and any one value built while rendering
MAX_ITEMS = 1_000_000  # items in one list, dict or iterator built while rendering
MAX_INT_BITS = 1 << 16  # integers: 10 ** (10 ** 10) would take hours to compute
TIME_LIMIT_S = 1.0  # real templates render in milliseconds

# Filters that pick, reorder or count existing values (their output is no larger than their
# input); every other filter builds text from its input, so its input's full size is checked.
_ITEM_FILTERS = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int",
    "items", "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse",
    "round", "select", "selectattr", "slice", "sort", "sum", "unique", "filesizeformat"})
# Regex-heavy or pure-Python text filters no chat template uses: a long message would make them slow.
_REMOVED_FILTERS = ("striptags", "urlize", "wordwrap")


class ChatTemplateError(TokenloomError):
    """The chat template is missing, invalid, failed while rendering or went over its budget."""


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def _size(value, budget: _Budget) -> int:
    """Characters `str(value)` could take, items of containers counted with repetition (a list
    holding one long string 1000 times is 1000 times as long once printed). The walk stops as
    soon as the total passes the budget, so shared or cyclic structures cost little."""
    total, stack, seen = 0, [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen % 4096 == 0:
            budget.tick()
        if isinstance(v, str):
            total += len(v) + 1
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            strings = [x for x in items if type(x) is str]  # the common case, summed without the loop
            total += 2 + sum(map(len, strings)) + len(strings)
            if len(strings) < len(items):
                stack.extend(x for x in items if type(x) is not str)
        elif isinstance(v, Namespace):
            total += 2
            stack.extend(object.__getattribute__(v, "_Namespace__attrs").values())
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        else:
            total += 1
        if total > budget.max_chars:
            break
    return total


def _sized(value) -> bool:
    try:
        len(value)
    except TypeError:
        return False
    return True


class _Budget:
    """The deadline and the size limit of one render."""

    def __init__(self, time_limit_s: float, max_chars: int):
        self.time_limit_s, self.max_chars = time_limit_s, max_chars
        self.deadline = time.monotonic() + time_limit_s

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template: rendering took longer than {self.time_limit_s:g} s "
                                    "(a loop or a recursion that does not end?)")

    def fits(self, chars: int) -> None:
        if chars > self.max_chars:
            raise ChatTemplateError(f"chat template: the rendered text would be larger than "
                                    f"{self.max_chars} characters")

    def fits_value(self, *values) -> None:
        self.fits(sum(_size(v, self) for v in values))

    def items(self, n: int) -> None:
        if n > MAX_ITEMS:
            raise ChatTemplateError(f"chat template: a list would have more than {MAX_ITEMS} items")

    def width(self, n) -> None:
        """A width, count or repetition given to a function (`center(n)`, `range(n)`, `'%9d'`)."""
        if isinstance(n, int) and n > self.max_chars:
            raise ChatTemplateError(f"chat template: {n} is larger than the limit for a width or count "
                                    f"({self.max_chars})")

    def result(self, value):
        """Check what an operation returned; lazy iterators are wrapped to be checked as they run."""
        if isinstance(value, str):
            self.fits(len(value))
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            self.items(len(value))
        elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise ChatTemplateError(f"chat template: a number would have more than {MAX_INT_BITS} bits")
        elif hasattr(value, "__next__") and not isinstance(value, _Iter):
            return _Iter(value, self)
        return value

    def materialize(self, value):
        """`value` as a list when it is a one-shot iterator, counting as it goes."""
        if isinstance(value, (str, list, tuple, dict, set, frozenset, range)):
            return value
        items = list(islice(iter(value), MAX_ITEMS + 1))
        self.items(len(items))
        return items

    def printf(self, fmt: str) -> None:
        """Widths and precisions in a printf-style format (`'%9999999d' % 1`)."""
        for m in re.finditer(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?", fmt):
            for n in m.groups():
                if n == "*":
                    raise ChatTemplateError("chat template: '*' widths in % formats are not supported")
                if n is not None:
                    self.width(int(n))

    def format_spec(self, fmt: str) -> None:
        """Widths and precisions in a str.format format (`'{:>9999999}'`)."""
        for _, _, spec, _ in string.Formatter().parse(fmt):
            if spec and "{" in spec:
                raise ChatTemplateError("chat template: nested fields in format specs are not supported")
            for n in re.findall(r"\d+", spec or ""):
                self.width(int(n))


class _Iter:
    """An iterable the template loops over, checking the deadline at every item."""

    def __init__(self, iterable, budget: _Budget):
        self._source, self._it, self._budget, self._n = iterable, iter(iterable), budget, 0

    def __iter__(self):
        return self

    def __len__(self):  # LoopContext uses it for loop.length / loop.last
        return len(self._source)

    def __bool__(self):  # `if value` on a lazy iterator (map, select ...): always true, as for the iterator
        return not _sized(self._source) or len(self._source) > 0

    def __next__(self):
        self._budget.tick()
        self._n += 1
        if self._n > MAX_ITEMS:
            self._budget.items(self._n)
        return next(self._it)


class _Guards(Extension):
    """Hooks the compiled template calls: loops iterate through `iterate`, `a ~ b` is `join`."""

    def iterate(self, iterable):
        return _Iter(iterable, self.environment.budget)

    def join(self, *parts) -> str:
        budget = self.environment.budget
        budget.tick()
        budget.fits_value(*parts)
        return "".join(map(str, parts))


class _Rewrite(NodeTransformer):
    """Route every for loop's iterable and every `~` through the `_Guards` hooks."""

    def __init__(self, ext_id: str):
        self.ext_id = ext_id

    def _hook(self, name: str, args: list, lineno: int) -> nodes.Call:
        return nodes.Call(nodes.ExtensionAttribute(self.ext_id, name, lineno=lineno), args, [], None, None,
                          lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._hook("iterate", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return self._hook("join", list(node.nodes), node.lineno)


class _TemplateNamespace(Namespace):
    """`namespace()` refusing underscore names (`ns.__html__` would be called by escaping), as in transformers."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace attribute cannot start with '_' ({name!r})")


class _TemplateDict:
    """`dict(...)` without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, keys in their order
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    if len(fmt) > 1000:
        raise ChatTemplateError("chat template: strftime_now format is too long")
    return datetime.now().strftime(fmt)


# -- filters whose output can be far larger than their input: checked before they run ---------
# Each takes the filter's value and arguments (after the value) and returns the value to use.

def _check_join(budget: _Budget, value, args, kwargs):
    value = budget.materialize(value)
    sep = args[0] if args else kwargs.get("d", "")
    budget.fits(_size(value, budget) + len(value) * len(str(sep)))
    return value


def _check_indent(budget: _Budget, value, args, kwargs):
    width = args[0] if args else kwargs.get("width", 4)
    width = len(width) if isinstance(width, str) else int(width)
    text = str(value)
    budget.fits(len(text) + (text.count("\n") + 1) * width)
    return value


def _check_replace(budget: _Budget, value, args, kwargs):
    if isinstance(value, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        budget.fits(len(value) + (value.count(old) if old else len(value) + 1) * len(new))
    return value


def _check_format(budget: _Budget, value, args, kwargs):
    if isinstance(value, str):
        budget.printf(value)
    return value


def _check_tojson(budget: _Budget, value, args, kwargs):
    indent = args[1] if len(args) > 1 else kwargs.get("indent")
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > 32:
        raise ChatTemplateError("chat template: tojson indent larger than 32")
    return value


def _check_sum(budget: _Budget, value, args, kwargs):
    start = args[1] if len(args) > 1 else kwargs.get("start", 0)
    if not isinstance(start, (int, float)):  # list + list + ...: quadratic time, so kept short
        value = budget.materialize(value)
        budget.items(len(value) * 100)
        budget.fits_value(value)
    return value


_FILTER_CHECKS = {"join": _check_join, "indent": _check_indent, "replace": _check_replace,
                  "format": _check_format, "tojson": _check_tojson, "sum": _check_sum}


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, budget: _Budget):
        super().__init__(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                         extensions=[loopcontrols, _Guards], finalize=self._finalize)
        self.budget = budget
        self.concat = self._concat  # joins the output of macros, {% set %} blocks and {% filter %} blocks
        self.globals.pop("lipsum", None)
        self.globals.update(raise_exception=_raise, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=_TemplateNamespace)
        for name in _REMOVED_FILTERS:
            self.filters.pop(name, None)
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: self._guard_test(f) for name, f in self.tests.items()}

    # -- sandbox hooks ------------------------------------------------------------------------

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj, attribute):
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.budget.tick()
        return super().getitem(obj, argument)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        budget = __self.budget
        budget.tick()
        for a in (*args, *kwargs.values()):
            budget.width(a)
        args = __self._check_str_method(__obj, args)
        return budget.result(super().call(__context, __obj, *args, **kwargs))

    def _check_str_method(self, obj, args: tuple) -> tuple:
        """Methods of str whose output can be far larger than their input."""
        s, name, budget = getattr(obj, "__self__", None), getattr(obj, "__name__", ""), self.budget
        if not isinstance(s, str):
            return args
        if name in ("translate", "expandtabs"):
            raise SecurityError(f"str.{name} is not available in chat templates")
        if name == "join" and args:
            items = budget.materialize(args[0])
            budget.fits(_size(items, budget) + len(items) * len(s))
            return (items, *args[1:])
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            count = s.count(args[0]) if args[0] else len(s) + 1
            budget.fits(len(s) + count * len(args[1]))
        return args

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        budget, fmt = self.budget, value.__self__

        def checked(*args, **kwargs):
            budget.format_spec(fmt)
            budget.fits_value(fmt, *args, *kwargs.values())
            return wrapper(*args, **kwargs)

        return functools.update_wrapper(checked, wrapper)

    def call_binop(self, context, operator, left, right):
        budget = self.budget
        budget.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str) and isinstance(n, int):
                    budget.fits(len(seq) * n)
                elif isinstance(seq, (list, tuple)) and isinstance(n, int) and n > 0:
                    budget.items(len(seq) * n)
                    budget.fits(_size(seq, budget) * n)
            if isinstance(left, int) and isinstance(right, int):
                self._bits(left.bit_length() + right.bit_length())
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            self._bits(left.bit_length() * right)
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
                budget.items(len(left) + len(right))
            budget.fits(_size(left, budget) + _size(right, budget))
        elif operator == "%" and isinstance(left, str):
            budget.printf(left)
            budget.fits_value(left, right)
        return budget.result(super().call_binop(context, operator, left, right))

    @staticmethod
    def _bits(n: int) -> None:
        if n > MAX_INT_BITS:
            raise ChatTemplateError(f"chat template: a number would have more than {MAX_INT_BITS} bits")

    # -- output, filters, tests ---------------------------------------------------------------

    def _finalize(self, value):
        """Every `{{ value }}` before it is turned into text."""
        self.budget.tick()
        if not isinstance(value, str):
            self.budget.fits_value(value)
        return value

    def _concat(self, parts) -> str:
        parts = list(parts)
        self.budget.tick()
        self.budget.fits(sum(len(p) for p in parts))
        return "".join(parts)

    def _guard_filter(self, name: str, f):
        # filters marked pass_context / pass_environment / pass_eval_context get that first
        skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0
        check = _FILTER_CHECKS.get(name)

        @functools.wraps(f)
        def guarded(*args, **kwargs):
            budget = self.budget
            budget.tick()
            head, value, rest = args[:skip], args[skip], args[skip + 1:]
            for a in (*rest, *kwargs.values()):
                budget.width(a)
            if check is not None:
                value = check(budget, value, rest, kwargs)
            if name not in _ITEM_FILTERS:
                budget.fits_value(value, *rest, *kwargs.values())
            elif _sized(value):
                budget.items(len(value))
            return budget.result(f(*head, value, *rest, **kwargs))

        return guarded

    def _guard_test(self, f):
        @functools.wraps(f)
        def guarded(*args, **kwargs):
            self.budget.tick()
            return f(*args, **kwargs)

        return guarded


def render_template(template: str, *, time_limit_s: float = TIME_LIMIT_S,
                    max_chars: int = MAX_OUTPUT_CHARS, **context) -> str:
    """Render `template` with `context`; any failure, or going over the budget, is a ChatTemplateError."""
    budget = _Budget(time_limit_s, max_chars)
    env = _Environment(budget)
    try:
        compiled = env.from_string(_Rewrite(_Guards.identifier).visit(env.parse(template)))
        budget.deadline = time.monotonic() + time_limit_s  # compiling is not the template's doing
        out, size = [], 0
        for chunk in compiled.generate(**context):
            size += len(chunk)
            budget.fits(size)
            budget.tick()
            out.append(chunk)
    except ChatTemplateError:
        raise
    except RecursionError:
        raise ChatTemplateError("chat template: recursion too deep") from None
    except MemoryError:
        raise ChatTemplateError("chat template: out of memory while rendering") from None
    except Exception as e:  # noqa: BLE001 - whatever the template does wrong is the template's error
        raise ChatTemplateError(f"failed to render: {type(e).__name__}: {e}") from None
    return "".join(out)
