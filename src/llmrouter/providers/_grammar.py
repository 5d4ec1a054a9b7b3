"""Grammars for constrained decoding: GBNF for JSON, and a check of any GBNF text before it is used.

llama.cpp reports a grammar that does not parse by printing to stderr, and it is an optional
dependency; the router checks every request's grammar at its edge, for every kind of deployment. So
`check_grammar` parses GBNF itself: a port of `llama_grammar_parser::parse` (src/llama-grammar.cpp in
the llama.cpp that llama-cpp-python 0.3.36 vendors) that builds the same rules and gives llama.cpp's
messages with a line, column and character offset. tests/unit/test_grammar.py holds its verdicts to
llama.cpp's own.

It is stricter than llama.cpp where llama.cpp would take a grammar and then never finish: left
recursion through a rule that matches the empty text only indirectly (llama.cpp looks one rule deep,
then grows its stacks until the process aborts), and a repetition `{m,n}` with n < m (llama.cpp counts
n - m rules down from 2**64). It also refuses a NUL character, where C would cut the grammar short.

And it is bounded, where llama.cpp is not: groups nest at most `max_depth` deep (the parser recurses
once a group, as llama.cpp's does), the repetitions expand to at most `max_rules` rules (`"a"{0,2000}`
is 2,000 of them in 11 characters), and the text is at most `max_bytes` long. The caller passes the
limits of `checks:` in the config; the defaults are the most those may be.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from llmrouter.errors import InvalidRequest, quoted

__all__ = ["MAX_DEPTH", "MAX_RULES", "check_grammar", "json_object_grammar", "json_schema_grammar"]

# The most `checks.grammar_depth` and `checks.grammar_rules` may be (settings.CheckSettings): two
# frames of recursion a group leave room below Python's limit of 1,000 wherever the check runs.
MAX_DEPTH = 256
MAX_RULES = 1_000_000

_GRAMMAR_PARAM = "response_format.grammar"
_SCHEMA_PARAM = "response_format.json_schema.schema"
_UNUSABLE = re.compile("[\0\ud800-\udfff]")  # C would stop at a NUL; a lone surrogate is no UTF-8

# Whitespace is at most one newline and 20 indents at a time (`ws`), so a small model cannot loop on
# it; the root object has no trailing whitespace, so the text ends where the object closes.
_JSON_OBJECT = r"""root   ::= "{" ws ( member ( "," ws member )* )? "}"
member ::= string ":" ws value
value  ::= object | array | string | number | ( "true" | "false" | "null" ) ws
object ::= "{" ws ( member ( "," ws member )* )? "}" ws
array  ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" char* "\"" ws
char   ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]{1,16} )? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""


def json_object_grammar() -> str:
    """GBNF whose root is any JSON object (the shape of llama.cpp's grammars/json.gbnf)."""
    return _JSON_OBJECT


def json_schema_grammar(
    schema: dict[str, Any],
    *,
    max_bytes: int | None = None,
    max_depth: int = MAX_DEPTH,
    max_rules: int = MAX_RULES,
) -> str:
    """GBNF for the JSON that `schema` describes, by llama-cpp-python's converter (which needs the
    `local` extra). InvalidRequest for a schema it cannot convert, or converts into broken GBNF or
    into a grammar beyond the limits (as `check_grammar`)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar: str = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter fails by assert, KeyError, ValueError...: all mean "cannot"
        reason = str(exc) or type(exc).__name__
        raise InvalidRequest(
            f"The JSON schema cannot be turned into a grammar: {reason}", param=_SCHEMA_PARAM
        ) from None
    try:
        check_grammar(grammar, max_bytes=max_bytes, max_depth=max_depth, max_rules=max_rules)
    except InvalidRequest as exc:  # e.g. a `pattern` the converter translated into broken GBNF
        raise InvalidRequest(
            f"The JSON schema cannot be turned into a grammar: {exc.message}", param=_SCHEMA_PARAM
        ) from None
    return grammar


def check_grammar(
    text: str,
    *,
    is_token: Callable[[str], bool] | None = None,
    max_bytes: int | None = None,
    max_depth: int = MAX_DEPTH,
    max_rules: int = MAX_RULES,
) -> None:
    """InvalidRequest unless llama.cpp will take `text` as a grammar with a `root` rule, within the
    limits; its message says where: line and column (from 1) and character offset (from 0).

    A `<text>` token names one token of a model's vocabulary; `is_token` says whether it does, and
    without it (no model at hand) any such token is taken.
    """
    if max_bytes is not None and len(text) > max_bytes // 4 and len(text.encode()) > max_bytes:
        raise InvalidRequest(
            f"Invalid grammar: it is {len(text.encode())} bytes; llmrouter takes grammars of at "
            f"most {max_bytes} bytes (checks.grammar_bytes).",
            param=_GRAMMAR_PARAM,
        )
    if unusable := _UNUSABLE.search(text):
        what = "a NUL character" if unusable[0] == "\0" else "a lone surrogate, which is not UTF-8"
        raise InvalidRequest(
            f"Invalid grammar: {what} {_where(text, unusable.start())}", param=_GRAMMAR_PARAM
        )
    parser = _Parser(text, max_depth, max_rules)
    try:
        parser.parse()
        if is_token is not None:
            for token, at in parser.tokens:
                if not is_token(token):
                    raise _Error(f"invalid token '{token}' (not one token of this model)", at)
    except _Error as exc:
        raise InvalidRequest(
            f"Invalid grammar: {exc.reason} {_where(text, exc.at)}", param=_GRAMMAR_PARAM
        ) from None
    if not parser.rules:
        raise InvalidRequest("Invalid grammar: it defines no rules.", param=_GRAMMAR_PARAM)
    if "root" not in parser.symbols:
        raise InvalidRequest("Invalid grammar: it has no rule named 'root'.", param=_GRAMMAR_PARAM)
    looping = parser.left_recursive()
    if looping is not None:
        name = looping.split("_")[0]  # a rule llama.cpp made for a group or repetition: `name_12`
        raise InvalidRequest(
            f"Invalid grammar: rule '{name}' is left-recursive (it can reach itself before matching "
            f"any text) {_where(text, parser.defined_at[name])}",
            param=_GRAMMAR_PARAM,
        )


def _where(text: str, at: int) -> str:
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    rest = text[at:].split("\n", 1)[0][:24]
    near = f": {rest!r}" if rest else ""
    return f"at line {line}, column {column} (character {at}){near}"


class _Error(Exception):
    def __init__(self, reason: str, at: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.at = at


# A rule is a list of elements as in llama.cpp: a reference to another rule (its id), a terminal
# (a character, a class member or a token), and the markers between and after alternatives.
_SYM, _ALT, _END = "sym", "alt", "end"
_Element = int | str

_MAX_REPETITIONS = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_MAX_COUNT = 2**64 - 1  # std::stoull's range
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_SIMPLE_ESCAPES = frozenset('trn\\"[]-')


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _is_word(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z" or c == "-" or _is_digit(c)


class _Parser:
    """llama_grammar_parser, function for function; `pos` walks `src` as the C pointer walks the
    NUL-terminated string (the text has no NUL of its own), so the port can stay literal."""

    def __init__(self, text: str, max_depth: int = MAX_DEPTH, max_rules: int = MAX_RULES) -> None:
        self.src = text + "\0"
        self.max_depth = max_depth
        self.max_rules = max_rules
        self.depth = 0  # groups open around the parser's position
        self.symbols: dict[str, int] = {}
        self.rules: dict[int, list[_Element]] = {}
        self.defined_at: dict[str, int] = {}
        self.referenced_at: dict[int, int] = {}
        self.tokens: list[tuple[str, int]] = []  # the `<text>` tokens, for a vocabulary to check

    def parse(self) -> None:
        pos = self._space(0, newline_ok=True)
        while self.src[pos] != "\0":
            pos = self._rule(pos)
        undefined = [(at, sid) for sid, at in self.referenced_at.items() if sid not in self.rules]
        if undefined:
            at, sid = min(undefined)
            name = next(n for n, i in self.symbols.items() if i == sid)
            raise _Error(f"Undefined rule identifier {quoted(name)}", at)

    def _symbol(self, name: str) -> int:
        return self.symbols.setdefault(name, len(self.symbols))

    def _generate(self, base: str) -> int:
        sid = len(self.symbols)
        self.symbols[f"{base}_{sid}"] = sid
        return sid

    def _space(self, pos: int, newline_ok: bool) -> int:
        src = self.src
        while src[pos] in " \t#" or (newline_ok and src[pos] in "\r\n"):
            if src[pos] == "#":
                while src[pos] not in "\0\r\n":
                    pos += 1
            else:
                pos += 1
        return pos

    def _name(self, pos: int) -> int:
        end = pos
        while _is_word(self.src[end]):
            end += 1
        if end == pos:
            raise _Error("expecting name", pos)
        return end

    def _int(self, pos: int) -> tuple[int, int]:
        end = pos
        while _is_digit(self.src[end]):
            end += 1
        if end == pos:
            raise _Error("expecting integer", pos)
        value = int(self.src[pos:end])
        if value > _MAX_COUNT:
            raise _Error("number too large", pos)
        return value, end

    def _char(self, pos: int) -> int:
        src = self.src
        if src[pos] == "\\":
            escape = src[pos + 1]
            if escape in _HEX_DIGITS:
                return self._hex(pos + 2, _HEX_DIGITS[escape])
            if escape in _SIMPLE_ESCAPES:
                return pos + 2
            raise _Error("unknown escape", pos)
        if src[pos] != "\0":
            return pos + 1
        raise _Error("unexpected end of input", pos)

    def _hex(self, pos: int, size: int) -> int:
        end = pos
        while end < pos + size and self.src[end] in "0123456789abcdefABCDEF":
            end += 1
        if end != pos + size:
            raise _Error(f"expecting {size} hex chars", pos)
        return end

    def _token(self, pos: int) -> int:
        src, start = self.src, pos
        if src[pos] != "<":
            raise _Error("expecting '<'", pos)
        pos += 1
        if src[pos] == "[":  # <[id]>
            token_id, pos = self._int(pos + 1)
            if token_id > 0xFFFFFFFF:
                raise _Error("parsed token id is too big", start + 2)
            if src[pos] != "]":
                raise _Error("expecting ']'", pos)
            if src[pos + 1] != ">":
                raise _Error("expecting '>'", pos + 1)
            return pos + 2
        while src[pos] not in "\0>":
            pos += 1
        if src[pos] != ">":
            raise _Error("expecting '>'", pos)
        self.tokens.append((src[start : pos + 1], start))
        return pos + 1

    def _rule(self, pos: int) -> int:
        src = self.src
        end = self._name(pos)
        after = self._space(end, newline_ok=False)
        name = src[pos:end]
        rule_id = self._symbol(name)
        self.defined_at.setdefault(name, pos)
        if src[after : after + 3] != "::=":
            raise _Error("expecting ::=", after)
        pos = self._alternates(self._space(after + 3, newline_ok=True), name, rule_id, nested=False)
        if src[pos] == "\r":
            pos += 2 if src[pos + 1] == "\n" else 1
        elif src[pos] == "\n":
            pos += 1
        elif src[pos] != "\0":
            raise _Error("expecting newline or end", pos)
        return self._space(pos, newline_ok=True)

    def _alternates(self, pos: int, name: str, rule_id: int, nested: bool) -> int:
        rule: list[_Element] = []
        pos = self._sequence(pos, name, rule, nested)
        while self.src[pos] == "|":
            rule.append(_ALT)
            pos = self._sequence(self._space(pos + 1, newline_ok=True), name, rule, nested)
        rule.append(_END)
        self.rules[rule_id] = rule
        return pos

    def _sequence(self, pos: int, name: str, rule: list[_Element], nested: bool) -> int:
        src = self.src
        last_start = len(rule)  # where the item a repetition applies to begins
        n_prev = 1  # rules in that item: llama.cpp bounds their product with the repetitions

        def repeat(low: int, high: int | None, at: int) -> None:
            """S{m,n} -> S (m times) S'(n-m), with S'(x) ::= S S'(x-1) | ; S{m,} -> S (m times) S',
            with S' ::= S S' | (llama.cpp's rewrite, which makes the same rules)."""
            nonlocal n_prev
            if last_start == len(rule):
                raise _Error("expecting preceding item to */+/?/{", at)
            if high is not None and high < low:
                raise _Error(f"the repetition's maximum {high} is below its minimum {low}", at)
            item = rule[last_start:]
            total = high if high else low or 1
            if n_prev * total > _MAX_REPETITIONS:
                raise _Error(
                    "number of rules that are going to be repeated multiplied by the new repetition "
                    "exceeds sane defaults, please reduce the number of repetitions or rule complexity",
                    at,
                )
            optional = 1 if high is None else high - low
            if len(self.symbols) + optional > self.max_rules:
                raise self._too_many_rules(at)
            if low == 0:
                del rule[last_start:]
            else:
                rule.extend(item * (low - 1))
            last = 0
            for i in range(optional):
                rec = self._generate(name)
                tail: list[_Element] = [rec if high is None else last] if i > 0 or high is None else []
                self.rules[rec] = [*item, *tail, _ALT, _END]
                last = rec
            if optional > 0:
                rule.append(last)
            n_prev *= total

        while (c := src[pos]) != "\0":
            at = pos
            if c == '"' or c == "[":
                pos += 2 if src[pos : pos + 2] == "[^" else 1
                last_start, n_prev = len(rule), 1
                closing = '"' if c == '"' else "]"
                while src[pos] != closing:
                    if src[pos] == "\0":
                        raise _Error("unexpected end of input", pos)
                    pos = self._char(pos)
                    rule.append(_SYM)
                    if c == "[" and src[pos] == "-" and src[pos + 1] != "]":
                        if src[pos + 1] == "\0":
                            raise _Error("unexpected end of input", pos + 1)
                        pos = self._char(pos + 1)
                        rule.append(_SYM)
                pos = self._space(pos + 1, nested)
            elif c == "<" or c == "!":
                pos = self._token(pos + 1 if c == "!" else pos)
                last_start, n_prev = len(rule), 1
                rule.append(_SYM)
                pos = self._space(pos, nested)
            elif _is_word(c):
                end = self._name(pos)
                ref = self._symbol(src[pos:end])
                self.referenced_at.setdefault(ref, pos)
                pos = self._space(end, nested)
                last_start, n_prev = len(rule), 1
                rule.append(ref)
            elif c == "(":
                if self.depth == self.max_depth:
                    raise _Error(
                        f"groups nested deeper than {self.max_depth} (llmrouter's limit, "
                        "checks.grammar_depth)",
                        at,
                    )
                if len(self.symbols) >= self.max_rules:
                    raise self._too_many_rules(at)
                pos = self._space(pos + 1, newline_ok=True)
                before = len(self.symbols)
                group = self._generate(name)
                self.depth += 1
                pos = self._alternates(pos, name, group, nested=True)
                self.depth -= 1
                n_prev = max(1, len(self.symbols) - before)
                last_start = len(rule)
                rule.append(group)
                if src[pos] != ")":
                    raise _Error("expecting ')'", pos)
                pos = self._space(pos + 1, nested)
            elif c == ".":
                last_start, n_prev = len(rule), 1
                rule.append(_SYM)
                pos = self._space(pos + 1, nested)
            elif c in "*+?":
                pos = self._space(pos + 1, nested)
                repeat(1 if c == "+" else 0, 1 if c == "?" else None, at)
            elif c == "{":
                pos = self._space(pos + 1, nested)
                if not _is_digit(src[pos]):
                    raise _Error("expecting an int", pos)
                low, pos = self._int(pos)
                pos = self._space(pos, nested)
                high: int | None = None
                if src[pos] == "}":
                    high = low
                elif src[pos] == ",":
                    pos = self._space(pos + 1, nested)
                    if _is_digit(src[pos]):
                        high, pos = self._int(pos)
                        pos = self._space(pos, nested)
                    if src[pos] != "}":
                        raise _Error("expecting '}'", pos)
                else:
                    raise _Error("expecting ','", pos)
                pos = self._space(pos + 1, nested)
                if low > _MAX_REPETITIONS:
                    raise _Error(
                        "number of repetitions exceeds sane defaults, please reduce the number of "
                        "repetitions",
                        at,
                    )
                if high is not None and high > _MAX_REPETITIONS:
                    high = None  # as llama.cpp: a large maximum means none
                repeat(low, high, at)
            else:
                break
        return pos

    def _too_many_rules(self, at: int) -> _Error:
        return _Error(
            f"it expands to more than {self.max_rules} rules (llmrouter's limit, checks.grammar_rules)",
            at,
        )

    def left_recursive(self) -> str | None:
        """The name of a rule that can reach itself before matching any text, if there is one."""
        alternatives = {sid: _split(rule) for sid, rule in self.rules.items()}
        nullable = _nullable(alternatives)
        first: dict[int, list[int]] = {}  # the rules each rule can begin with
        for sid, alts in alternatives.items():
            first[sid] = []
            for alt in alts:
                for e in alt:
                    if not isinstance(e, int):
                        break
                    first[sid].append(e)
                    if e not in nullable:
                        break
        names = {sid: name for name, sid in self.symbols.items()}
        state: dict[int, bool] = {}  # True while on the current path, False once done
        for start in first:
            if start in state:
                continue
            state[start] = True
            path = [(start, iter(first[start]))]
            while path:
                sid, nexts = path[-1]
                for nxt in nexts:
                    if state.get(nxt):
                        return names[nxt]
                    if nxt not in state:
                        state[nxt] = True
                        path.append((nxt, iter(first[nxt])))
                        break
                else:
                    state[sid] = False
                    path.pop()
        return None


def _split(rule: list[_Element]) -> list[list[_Element]]:
    alternatives: list[list[_Element]] = [[]]
    for e in rule[:-1]:  # the last element is _END
        if e == _ALT:
            alternatives.append([])
        else:
            alternatives[-1].append(e)
    return alternatives


def _nullable(alternatives: dict[int, list[list[_Element]]]) -> set[int]:
    """The rules that can match the empty text: a rule is, once every element of one of its
    alternatives is. Each alternative counts its elements not yet known to be (a terminal never
    is), and a rule found to be lowers the counts of the alternatives that use it: time in
    proportion to the grammar, where a fixed point over all rules takes a pass per rule of a chain."""
    waiting: list[int] = []  # per alternative: its elements not known to match the empty text
    owner: list[int] = []  # per alternative: its rule
    used_in: dict[int, list[int]] = {}  # per rule: the alternatives that refer to it, once a use
    found: list[int] = []
    for sid, alts in alternatives.items():
        for alt in alts:
            k = len(waiting)
            owner.append(sid)
            refs = [e for e in alt if isinstance(e, int)]
            if len(refs) < len(alt):
                waiting.append(-1)  # a terminal: never empty
                continue
            waiting.append(len(refs))
            for ref in refs:
                used_in.setdefault(ref, []).append(k)
            if not refs:
                found.append(sid)
    nullable: set[int] = set()
    while found:
        sid = found.pop()
        if sid in nullable:
            continue
        nullable.add(sid)
        for k in used_in.get(sid, ()):
            waiting[k] -= 1
            if waiting[k] == 0 and owner[k] not in nullable:
                found.append(owner[k])
    return nullable
