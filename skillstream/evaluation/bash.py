"""Score a predicted bash command against gold commands (NL2Bash-style tasks).

Three levels, from strict to lenient:

* :func:`bash_exact_match` -- equal after :func:`normalize_bash` (whitespace and
  quoting style do not matter, anything that changes what bash runs does).
* :func:`bash_structure_score` -- similarity of the *structure* (which utilities run,
  in which order, with which flags), ignoring arguments such as paths and patterns.
* :func:`extract_command` -- turns a chat model's answer into the command to score.

None of these functions raises on malformed bash: model output is often broken, and
a broken prediction should score low, not crash an evaluation run.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence

import bashlex

from skillstream.errors import UserError

Structure = list[tuple[str, frozenset[str]]]

# --------------------------------------------------------------------------- extraction

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh", "shell-session", "terminal"}
_PROMPT = re.compile(r"^(?:\$|bash\$|bash>|%)\s+")


def extract_command(model_output: str) -> str:
    """The command a chat model meant: the first command of its first shell code block.

    Takes the first fenced block tagged bash/sh/shell/console (or untagged); any fenced
    block if none is; the plain text if there is no fence. Inside it, prompts like
    ``$ `` / ``bash> `` are stripped and comment or blank lines skipped. The first command
    is returned together with its continuation lines (after a trailing ``\\``, ``|``,
    ``&&``, ``||`` or inside an open quote), newlines kept as bash would read them.
    """
    blocks = _FENCE.findall(model_output)
    if blocks:
        shell = [body for lang, body in blocks if lang.lower() in _SHELL_LANGS]
        text = (shell or [blocks[0][1]])[0]
    else:
        text = model_output
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not lines:
            line = _PROMPT.sub("", line)
            if not line or line.startswith("#"):
                continue
        lines.append(line)
        if not _continues("\n".join(lines)):
            break
    return unwrap_shell_c("\n".join(lines))


def unwrap_shell_c(cmd: str) -> str:
    """`bash -c "ls -la"` (or sh/zsh -c) runs `ls -la`: score the command it runs, not the wrapper.
    SmolLM2-135M wraps most answers so; left wrapped, every one scored as the utility `bash`."""
    import shlex

    try:
        parts = shlex.split(cmd)
    except ValueError:  # unbalanced quotes: leave it to the scorer
        return cmd
    if len(parts) == 3 and parts[0] in ("bash", "sh", "zsh", "/bin/bash", "/bin/sh") and parts[1] == "-c":
        return parts[2].strip()
    return cmd


def _continues(cmd: str) -> bool:
    stripped = cmd.rstrip()
    return stripped.endswith(("\\", "|", "&&", "||")) or _has_open_quote(cmd)


def _has_open_quote(cmd: str) -> bool:
    try:
        _tokens(cmd)
    except _Unbalanced:
        return True
    return False


# ------------------------------------------------------------------------ normalisation

_OPERATORS = ("&&", "||", ";;", ">>", "<<", ">&", "<&", "&>", "|&", "|", "&", ";", "<", ">", "(", ")")
_GLOB = set("*?[~")  # unquoted these expand, so `*.c` and `'*.c'` are different commands


class _Unbalanced(ValueError):
    """An unterminated quote or substitution."""


def _tokens(cmd: str) -> list[tuple[str, bool]]:
    """Bash-like lexing into (canonical text, is_operator) pairs; raises _Unbalanced.

    A word's canonical text re-quotes its literal parts with :func:`shlex.quote`, so
    ``'a b'``, ``"a b"`` and ``a\\ b`` all become ``'a b'``. Expansions (``$x``,
    ``$(..)``, backticks, unquoted globs, double-quoted text holding ``$``) are kept
    verbatim, since quoting changes their meaning.
    """
    out: list[tuple[str, bool]] = []
    segs: list[tuple[str, bool]] = []  # (text, is_literal) of the word being built
    started = False
    i, n = 0, len(cmd)

    def end_word() -> None:
        nonlocal started
        if started:
            out.append((_render(segs), False))
        segs.clear()
        started = False

    while i < n:
        c = cmd[i]
        if c == "\n":
            end_word()
            if out and out[-1][1] and out[-1][0] not in (";", ")"):
                pass  # `a |<newline>b`: the newline only continues the pipeline
            elif out:
                out.append((";", True))  # otherwise a newline separates commands like `;`
            i += 1
        elif c.isspace():
            end_word()
            i += 1
        elif c == "#" and not started:
            j = cmd.find("\n", i)  # a comment runs to the end of its line
            i = n if j < 0 else j
        elif c in "|&;<>()":
            if started and c in "<>" and all(s for t, s in segs) and "".join(t for t, _ in segs).isdigit():
                fd = "".join(t for t, _ in segs)  # `2>` is one redirection operator
                segs.clear()
                started = False
            else:
                fd = ""
                end_word()
            op = next(o for o in _OPERATORS if cmd.startswith(o, i))
            out.append((fd + op, True))
            i += len(op)
        elif c == "\\":
            if i + 1 < n and cmd[i + 1] == "\n":
                i += 2  # line continuation
                continue
            segs.append((cmd[i + 1 : i + 2] or "\\", True))
            started = True
            i += 2
        elif c == "'":
            j = cmd.find("'", i + 1)
            if j < 0:
                raise _Unbalanced(cmd)
            segs.append((cmd[i + 1 : j], True))
            started = True
            i = j + 1
        elif c == '"':
            j, text, expands = i + 1, [], False
            while j < n and cmd[j] != '"':
                if cmd[j] == "\\" and j + 1 < n and cmd[j + 1] in '$`"\\\n':
                    text.append(cmd[j : j + 2])
                    j += 2
                    continue
                expands = expands or cmd[j] in "$`"
                text.append(cmd[j])
                j += 1
            if j >= n:
                raise _Unbalanced(cmd)
            inner = "".join(text)
            if expands:
                segs.append(('"' + inner + '"', False))
            else:
                segs.append((re.sub(r'\\([$`"\\])', r"\1", inner), True))
            started = True
            i = j + 1
        elif (c == "$" and cmd.startswith(("$(", "${"), i)) or c == "`":
            j = _matching(cmd, i)
            segs.append((cmd[i:j], False))
            started = True
            i = j
        else:
            segs.append((c, c not in _GLOB and c != "$"))
            started = True
            i += 1
    end_word()
    return out


def _matching(cmd: str, i: int) -> int:
    """End index (exclusive) of the `$(..)`, `${..}` or backtick group starting at i."""
    if cmd[i] == "`":
        j = cmd.find("`", i + 1)
        if j < 0:
            raise _Unbalanced(cmd)
        return j + 1
    open_, close = cmd[i + 1], {"(": ")", "{": "}"}[cmd[i + 1]]
    depth, j, quote = 0, i + 1, ""
    while j < len(cmd):
        ch = cmd[j]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise _Unbalanced(cmd)


def _render(segs: list[tuple[str, bool]]) -> str:
    out, lit = [], []
    for text, literal in segs:
        if literal:
            lit.append(text)
            continue
        if lit:
            out.append(shlex.quote("".join(lit)))
            lit = []
        out.append(text)
    if lit or not out:
        out.append(shlex.quote("".join(lit)))
    return "".join(out)


def normalize_bash(cmd: str) -> str:
    """Canonical text of a command: one space between tokens, one quoting style.

    ``grep  'a b' f``, ``grep "a b" f`` and ``grep a\\ b f`` all give ``grep 'a b' f``;
    ``a|b`` gives ``a | b``; a trailing ``;`` or comment is dropped. A command with an
    unbalanced quote is not valid bash: it falls back to a plain whitespace split, so it
    never equals a well-formed command.
    """
    try:
        toks = _tokens(cmd)
    except _Unbalanced:
        return " ".join(cmd.split())
    while toks and toks[-1] == (";", True):
        toks.pop()
    return " ".join(t for t, _ in toks)


def _golds(golds: str | Sequence[str]) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    golds = list(golds)
    if not golds:
        raise UserError("golds is empty: need at least one gold command to compare against")
    return golds


def bash_exact_match(pred: str, golds: str | Sequence[str]) -> bool:
    """True if ``pred`` equals any gold after :func:`normalize_bash`."""
    p = normalize_bash(pred)
    return any(p == normalize_bash(g) for g in _golds(golds))


# ---------------------------------------------------------------------------- structure

# These take single-dash long options (`find -name`), so `-name` is not `-n -a -m -e`.
_SINGLE_DASH_LONG = {"find", "java", "gcc", "g++", "cc", "clang", "ffmpeg", "xdotool"}
# find actions whose arguments, up to `;` or `+`, are a command of their own.
_EXEC_ACTIONS = {"-exec", "-execdir", "-ok", "-okdir"}
# Wrappers that run another command: options taking a separate argument, and how many
# positional arguments come before the wrapped command (timeout's DURATION).
_WRAPPERS: dict[str, tuple[set[str], int]] = {
    "xargs": ({"-I", "-n", "-P", "-d", "-L", "-s", "-E", "-a", "--max-args", "--max-procs",
               "--delimiter", "--arg-file", "--max-lines", "--max-chars"}, 0),
    "sudo": ({"-u", "-g", "-p", "-C", "-h", "--user", "--group"}, 0),
    "nice": ({"-n", "--adjustment"}, 0),
    "timeout": ({"-s", "-k", "--signal", "--kill-after"}, 1),
    "watch": ({"-n", "--interval"}, 0),
    "env": ({"-u", "--unset", "-C", "--chdir"}, 0),
    "stdbuf": ({"-i", "-o", "-e"}, 0),
    "nohup": (set(), 0), "time": (set(), 0), "exec": (set(), 0),
    "command": (set(), 0), "builtin": (set(), 0), "strace": ({"-o", "-e", "-p"}, 0),
}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _flags(tok: str, single_dash_long: bool) -> set[str]:
    """The options one argument stands for: `-la` -> {-l, -a}; `--color=auto` -> {--color}."""
    if tok.startswith("--") and len(tok) > 2:
        return {tok.split("=", 1)[0]}
    if single_dash_long:  # `find -mtime -30`: -30 is a value
        return {tok} if re.fullmatch(r"-[A-Za-z][\w-]*", tok) else set()
    if re.fullmatch(r"-\d+", tok):  # `ls -1`, `xargs -0`, `head -5`
        return {tok}
    m = re.match(r"-([A-Za-z]+)", tok)  # `-n5` is {-n}: the 5 is the option's value
    return {"-" + ch for ch in m.group(1)} if m else set()


class _Word:
    """An argument's text plus the bashlex command nodes substituted inside it."""

    __slots__ = ("text", "subs")

    def __init__(self, text: str, subs: list | None = None) -> None:
        self.text, self.subs = text, subs or []


def _command(words: list[_Word], out: Structure) -> None:
    """Append the entry for one simple command, then the commands nested in it.

    Nesting rule: a command run *by* another one -- `find -exec CMD ;`, `xargs CMD`,
    `sudo CMD`, ..., `$(CMD)`, `` `CMD` ``, `<(CMD)` -- is an entry of its own placed
    right after the command containing it (in textual order), and its flags count for
    it, not for the outer command. `-exec` itself stays one of find's flags.
    """
    pre: list = []
    while words and _ASSIGNMENT.match(words[0].text):
        pre += words[0].subs  # `X=$(date) cmd`: date still runs, before cmd
        words = words[1:]  # `LC_ALL=C sort` runs sort
    if not words:
        for sub in pre:
            _walk(sub, out)
        return
    util = os.path.basename(words[0].text) or words[0].text
    single_dash = util in _SINGLE_DASH_LONG
    wrapper = _WRAPPERS.get(util)
    positional = wrapper[1] if wrapper else 0
    flags: set[str] = set()
    # (word position, bashlex node or word list) of the commands nested in this one
    nested: list[tuple[int, object]] = [(0, s) for s in pre + words[0].subs]
    options_done = False
    i = 1
    while i < len(words):
        tok = words[i].text
        nested += [(i, s) for s in words[i].subs]
        if single_dash and tok in _EXEC_ACTIONS:
            flags.add(tok)
            j = i + 1
            while j < len(words) and words[j].text not in (";", "+"):
                j += 1
            nested.append((i, words[i + 1 : j]))
            i = j + 1
            continue
        if tok == "--":
            options_done = True
        elif not options_done and tok.startswith("-") and len(tok) > 1:
            flags |= _flags(tok, single_dash)
            if wrapper and tok in wrapper[0]:
                i += 1  # the option's argument
                if i < len(words):
                    nested += [(i, s) for s in words[i].subs]
        elif wrapper and util == "env" and _ASSIGNMENT.match(tok):
            pass
        elif wrapper:
            if positional:
                positional -= 1
            else:
                nested.append((i, words[i:]))
                break
        i += 1
    out.append((util, frozenset(flags)))
    for _, item in sorted(nested, key=lambda x: x[0]):
        if isinstance(item, list):
            _command(item, out)
        else:
            _walk(item, out)


def _subs(node) -> list:
    """Command nodes of the substitutions inside a bashlex word node."""
    found = []
    for part in getattr(node, "parts", None) or []:
        if part.kind in ("commandsubstitution", "processsubstitution"):
            found.append(part.command)
        else:
            found += _subs(part)
    return found


def _walk(node, out: Structure) -> None:
    if node.kind == "command":
        words: list[_Word] = []
        for part in node.parts:
            if part.kind in ("word", "assignment"):
                words.append(_Word(part.word, _subs(part)))
        _command(words, out)
        for part in node.parts:  # `> $(date).log`: substitutions inside redirections
            if part.kind == "redirect" and not isinstance(part.output, int):
                for sub in _subs(part.output):
                    _walk(sub, out)
        return
    if node.kind == "word":  # e.g. `for f in $(ls)`
        for sub in _subs(node):
            _walk(sub, out)
        return
    for attr in ("parts", "list", "command", "output"):
        child = getattr(node, attr, None)
        for c in child if isinstance(child, list) else [child]:
            if hasattr(c, "kind"):
                _walk(c, out)


def _fallback_structure(cmd: str) -> Structure:
    """Our own lexer when bashlex cannot parse: split at operators, skip redirections."""
    try:
        toks = _tokens(cmd)
    except _Unbalanced:
        toks = [(t, False) for t in cmd.split()]
    out: Structure = []
    words: list[_Word] = []
    skip_next = False
    for text, is_op in toks + [(";", True)]:
        if is_op:
            if text.lstrip("0123456789") in ("<", ">", ">>", "&>", ">&", "<&", "<<"):
                skip_next = True
                continue
            _command(words, out)
            words = []
        elif skip_next:
            skip_next = False
        else:
            # undo our quoting so flags read the same as in bashlex's unquoted words
            try:
                text = " ".join(shlex.split(text))
            except ValueError:
                pass
            words.append(_Word(text))
    return out


def bash_structure(cmd: str) -> Structure:
    """(utility, flags) for every command that ``cmd`` runs, in order.

    Parsed with bashlex: pipelines, `&&`/`||`/`;` lists, subshells, loops and
    substitutions are all flattened into one list; nested commands follow the rule in
    :func:`_command`. Combined short options are split (`-la` -> `-l`, `-a`), long
    options keep only their name (`--color=auto` -> `--color`), and numbers like `-30`
    are values, not flags. If bashlex fails, a simple tokeniser is used instead.
    """
    out: Structure = []
    try:
        for node in bashlex.parse(cmd):
            _walk(node, out)
    except Exception:  # bashlex raises assorted errors (and asserts) on odd input
        return _fallback_structure(cmd)
    return out


def _similarity(p: Structure, g: Structure) -> float:
    """U * (1 + F) / 2, see :func:`bash_structure_score`."""
    if not p and not g:
        return 1.0
    if not p or not g:
        return 0.0
    # LCS over utilities; among equally long alignments keep the one sharing most flags.
    # Tuples add and compare lexicographically, which keeps the DP optimal.
    prev = [(0, 0)] * (len(g) + 1)
    for pu, pf in p:
        cur = [(0, 0)]
        for j, (gu, gf) in enumerate(g):
            best = max(prev[j + 1], cur[j])
            if pu == gu:
                diag = prev[j]
                best = max(best, (diag[0] + 1, diag[1] + len(pf & gf)))
            cur.append(best)
        prev = cur
    matched, shared = prev[-1]
    u = 2 * matched / (len(p) + len(g))
    n_flags = sum(len(f) for _, f in p) + sum(len(f) for _, f in g)
    f1 = 1.0 if n_flags == 0 else 2 * shared / n_flags
    return u * (1 + f1) / 2


def bash_structure_score(pred: str, golds: str | Sequence[str]) -> float:
    """Best over golds of ``U * (1 + F) / 2``, in [0, 1].

    * U = 2*LCS / (len(pred) + len(gold)) over the utility sequences of
      :func:`bash_structure` -- 1 iff the same utilities run in the same order.
    * F = flag F1 (Dice): 2 * flags shared by LCS-aligned commands / all flags on both
      sides; 1 when neither side has flags.

    Multiplying by U (rather than averaging U and F) makes a command with the wrong
    utilities score 0 even when neither side has flags; right utilities with entirely
    wrong flags score 0.5. The result is 1.0 iff utilities, order and flags all agree,
    so every exact match scores 1.0.
    """
    if not pred.strip():  # saying nothing matches only an empty gold, not one that is a bare redirection
        return 1.0 if any(not g.strip() for g in _golds(golds)) else 0.0
    p = bash_structure(pred)
    return max(_similarity(p, bash_structure(g)) for g in _golds(golds))
