"""Task metrics of the Dragon Hatching curriculum (usable by any recipe).

``function_call`` -- for prompt/completion examples whose target is
``<function_call>{"name": ..., "arguments": {...}}</function_call>`` blocks and whose ``meta`` holds
BFCL's ``functions``/``ground_truth``/``category`` (builtins ``bfcl_calls``, ``bfcl_tools``). The
answer is read with :func:`~skillstream.tools.calls.parse_model_output` and scored by the same
BFCL-AST scorer as the ``tool_call`` metric (:func:`skillstream.evaluation.tool_metrics.score_outputs`:
``ast_accuracy`` -- the main score --, ``tool_selection``, ``argument_accuracy``), plus
``function_format``: the share of answers with at least one ``<function_call>`` block and valid
JSON objects with a ``name`` inside every block.

``final_answer`` -- worked solutions ending in ``Answer: N``: the last ``Answer:`` number of the
output must equal the reference exactly (``exact_match``, the main score); ``answered`` is the
share of outputs that gave one at all.

Bash extras (added to the ``bash`` metric): ``bash_format`` -- the output has a fenced code block;
``command_validity`` -- the extracted command parses with ``bashlex`` and every utility it runs is in
:data:`KNOWN_UTILITIES` (POSIX utilities, GNU coreutils/findutils and the shell builtins that
NL2Bash's gold commands use; a made-up or misspelt command name is invalid). Gold NL2Bash commands
score 0.98 (``time echo`` is beyond bashlex).
"""
from __future__ import annotations

import json
import re

from .generation import generate

KNOWN_UTILITIES = frozenset("""
awk basename bash bc bunzip2 bzip2 cat cd chgrp chmod chown cksum cmp column comm cp cpio crontab csplit
cut date dd df diff dirname du echo egrep env expand export expr false fgrep file find fmt fold free
grep groups gunzip gzip head hexdump hostname id install join kill less ln locate logname ls lsof
md5sum mkdir mkfifo mktemp more mount mv nl nohup nproc od paste pgrep pkill printf ps pwd read readlink
realpath rename rev rm rmdir rsync scp sed seq sh sha1sum sha256sum shuf sleep sort split ssh stat
strings sudo sum tac tail tar tee test time timeout top touch tr true truncate tty type uname unexpand
uniq unzip uptime wc wget which whoami xargs xz yes zcat zip curl set source alias history ulimit
umask wait exit return shift unset
apt apt-get at base64 cal chroot dig dmesg dpkg fg bg getent gcc git host iconv ifconfig ip iptables jobs jq
journalctl last lsblk lscpu lspci lsusb make nc netstat nice nslookup openssl passwd perl ping pip pstree
python python3 renice route service su sysctl systemctl traceroute tree useradd users vim w watch who xxd
""".split())

_BLOCK = re.compile(r"<function_call>(.*?)</function_call>", re.S)
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")
_FENCED = re.compile(r"```[^\n]*\n.*?```", re.S)


def function_format_ok(output: str) -> bool:
    blocks = _BLOCK.findall(output)
    if not blocks:
        return False
    for b in blocks:
        try:
            obj = json.loads(b)
        except json.JSONDecodeError:
            return False
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return False
    return True


def score_function_calls(outputs: list[str], examples) -> dict:
    from .tool_metrics import score_outputs
    for ex in examples:
        if not {"functions", "ground_truth"} <= set(ex.meta or {}):
            from ..errors import UserError
            raise UserError(f"{ex.where}: metric 'function_call' needs BFCL functions and ground_truth "
                            "(builtins bfcl_calls, bfcl_tools)")
    out = score_outputs(outputs, examples)
    out.pop("per_example", None)
    fmt = [function_format_ok(o) for o in outputs]
    out["function_format"] = sum(fmt) / max(len(fmt), 1)
    return out


def final_answer(output: str) -> str | None:
    found = _ANSWER.findall(output)
    return found[-1] if found else None


def score_final_answers(outputs: list[str], examples) -> dict:
    answers = [final_answer(o) for o in outputs]
    em = [a is not None and a in ex.references for a, ex in zip(answers, examples)]
    return {"exact_match": sum(em) / max(len(em), 1), "outcomes": [int(e) for e in em],
            "answered": sum(a is not None for a in answers) / max(len(answers), 1)}


def command_valid(cmd: str) -> bool:
    import bashlex

    from .bash import bash_structure
    if not cmd.strip():
        return False
    try:
        bashlex.parse(cmd)
    except Exception:  # bashlex raises assorted errors on what it cannot parse
        return False
    utilities = [u for u, _ in bash_structure(cmd)]
    return bool(utilities) and all(u in KNOWN_UTILITIES for u in utilities)


def bash_extras(outputs: list[str], commands: list[str]) -> dict:
    n = max(len(outputs), 1)
    return {"bash_format": sum(bool(_FENCED.search(o)) for o in outputs) / n,
            "command_validity": sum(command_valid(c) for c in commands) / n}


def evaluate_generated(kind: str, model, tok, renderer, examples, batch_size: int, max_new_tokens: int) -> dict:
    """Generate greedily for every example and score with ``kind`` ('function_call' | 'final_answer')."""
    outputs = generate(model, tok, [renderer.prompt_text(ex) for ex in examples], max_new_tokens, batch_size)
    out = score_function_calls(outputs, examples) if kind == "function_call" else score_final_answers(outputs, examples)
    out["samples"] = [{"prompt": ex.prompt[-300:], "output": o[:300], "references": [ex.completion[:300]]}
                      for ex, o in zip(examples[:5], outputs[:5])]
    return out
