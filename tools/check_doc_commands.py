#!/usr/bin/env python
"""Check the commands that README.md, docs/, datasets/README.md and the config headers document.

    python tools/check_doc_commands.py [--list]

For every ``python <script>`` / ``bash <script>`` command in a code block, an inline code span or
a config file's header comment: the script exists; each ``--flag`` is one the script accepts
(read from its ``add_argument`` calls; ``run_main.sh`` passes its flags to ``tools/main_job.py``); each repository
path it names (``configs/...yaml``, ``tools/...py``, ...) exists; the trailing ``KEY VALUE``
options of ``train_net.py`` merge into its config, and those of ``main_job.py`` name existing
config keys; ``python -c`` code compiles and its ``from X import Y`` names import.
Placeholders (``CFG``, ``W``, ``DIR``, ``...``, ``$VAR``) are not checked as paths. Exit status 1
lists each problem with the file and line of the command.
"""

import argparse
import glob
import importlib
import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))

DOCS = ["README.md", "CONTRIBUTING.md", "datasets/README.md", "docs/*.md"]
CONFIG_HEADERS = ["configs/**/*.yaml"]
REPO_DIRS = ("configs/", "tools/", "projects/", "demo/", "datasets/", "tests/", "docs/")
# scripts whose flags go to another script (or to pytest, whose flags are not checked)
FLAGS_OF = {"tools/run_main.sh": "tools/main_job.py", "tools/run_tests.sh": None, "tools/setup_env.sh": None}
OPT_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


@dataclass
class Command:
    source: str  # file:line
    tokens: List[str]  # a "$(...)" substitution is one token

    def shell(self) -> str:
        """The command as a shell line (substitutions left for the shell)."""
        return " ".join(t if t.startswith("$(") else shlex.quote(t) for t in self.tokens)

    @property
    def script(self) -> str:
        return self.tokens[1]


def _commands_in_line(line: str, source: str) -> List[Command]:
    substitutions = re.findall(r"\$\([^)]*\)", line)  # $(cat ...): kept whole, as one token
    for i, sub in enumerate(substitutions):
        line = line.replace(sub, f"__SUBST{i}__", 1)
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    for i, sub in enumerate(substitutions):
        tokens = [sub if t == f"__SUBST{i}__" else t for t in tokens]
    out, cur = [], []
    for t in tokens + ["&&"]:
        if t in ("&&", ";", "|", "||"):
            while cur and re.match(r"^[A-Z_]+=", cur[0]):  # FOO=bar python ...
                cur = cur[1:]
            if len(cur) >= 2 and cur[0] in ("python", "python3", "bash"):
                out.append(Command(source, [x.strip("[]") for x in cur if x.strip("[]")]))
            cur = []
        else:
            cur.append(t)
    return out


def _md_commands(path: str) -> List[Command]:
    rel = os.path.relpath(path, ROOT)
    lines = open(path, encoding="utf-8").read().splitlines()
    cmds, in_block, held, start = [], False, "", 0
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            held, start = (held + " " + line.strip(), start) if held else (line.strip(), i)
            if held.endswith("\\"):
                held = held[:-1]
                continue
            cmds += _commands_in_line(held, f"{rel}:{start}")
            held = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if span.startswith(("python ", "bash ")):
                    cmds += _commands_in_line(span, f"{rel}:{i}")
    return cmds


def _yaml_commands(path: str) -> List[Command]:
    rel = os.path.relpath(path, ROOT)
    cmds, held, start = [], "", 0
    for i, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.startswith("#"):
            break  # the header comment only
        text = line[1:].strip()
        if not held and not text.startswith(("python ", "bash ")):
            continue
        held, start = (held + " " + text, start) if held else (text, i)
        if held.endswith("\\"):
            held = held[:-1]
            continue
        cmds += _commands_in_line(held, f"{rel}:{start}")
        held = ""
    return cmds


def collect_commands() -> List[Command]:
    """Every documented python / bash command, in file order."""
    cmds: List[Command] = []
    for pattern in DOCS:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            cmds += _md_commands(path)
    for pattern in CONFIG_HEADERS:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
            cmds += _yaml_commands(path)
    return cmds


def _is_repo_path(token: str) -> bool:
    if "$" in token or "..." in token or "*" in token or "{" in token or "<" in token:
        return False
    return token.startswith(REPO_DIRS) and os.path.splitext(token)[1] in (
        ".py",
        ".sh",
        ".yaml",
        ".yml",
        ".md",
    )


_FLAG = re.compile(r"""["'](--[A-Za-z][\w-]*)["']""")


def script_flags(script: str) -> Set[str]:
    """The ``--flags`` a script defines: its own ``add_argument`` calls, those of the sibling
    modules it imports (``tools/analysis/common.py``) and Detectron2's
    ``default_argument_parser`` when it uses it. Read from the source: no script is started."""
    path = os.path.join(ROOT, script)
    src = open(path, encoding="utf-8").read()
    texts = [src]
    for mod in re.findall(r"^\s*(?:from|import) (\w+)", src, re.M):
        sibling = os.path.join(os.path.dirname(path), mod + ".py")
        if os.path.isfile(sibling) and os.path.abspath(sibling) != os.path.abspath(path):
            texts.append(open(sibling, encoding="utf-8").read())
    flags = {
        f for t in texts for call in re.findall(r"add_argument\(([^)]*)", t) for f in _FLAG.findall(call)
    }
    if "add_opts_argument(" in src:  # flowseg.utils.inference's shared --opts
        flags.add("--opts")
    if "default_argument_parser" in src:
        from detectron2.engine import default_argument_parser

        flags |= {o for a in default_argument_parser()._actions for o in a.option_strings}
    return flags | {"--help"}


def _check_flags(cmd: Command, script: str) -> List[str]:
    known = script_flags(script)
    flags = [t.split("=")[0] for t in cmd.tokens[2:] if t.startswith("--") and len(t) > 2]
    return [f"{script} has no option {f}" for f in flags if f not in known]


def _trailing_opts(tokens: List[str]) -> List[str]:
    """The ``KEY VALUE`` pairs among ``tokens`` (flags' values skipped)."""
    opts, i = [], 0
    while i < len(tokens):
        if OPT_KEY.match(tokens[i]) and i + 1 < len(tokens):
            opts += tokens[i : i + 2]
            i += 2
        else:
            i += 1
    return opts


def _cfg(config_file: Optional[str]):
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    cfg = add_flowseg_config(get_cfg())
    if config_file:
        cfg.merge_from_file(os.path.join(ROOT, config_file))
    return cfg


def _check_options(cmd: Command, script: str) -> List[str]:
    opts = _trailing_opts(cmd.tokens[2:])
    if script.endswith("train_net.py"):
        cfg_file = next(
            (cmd.tokens[i + 1] for i, t in enumerate(cmd.tokens[:-1]) if t == "--config-file"), None
        )
        if not cfg_file or not _is_repo_path(cfg_file) or not os.path.isfile(os.path.join(ROOT, cfg_file)):
            cfg_file = None  # a placeholder or a run's output: keys only
        values = opts[1::2]
        if cfg_file and not any(v == "..." or v.isupper() and len(v) <= 4 for v in values):
            try:
                _cfg(cfg_file).merge_from_list(opts)
            except Exception as e:  # noqa: BLE001  (yacs raises several types; report any)
                return [f"{cfg_file} + {opts}: {e}"]
            return []
    elif not script.endswith("main_job.py"):
        return []
    cfg = _cfg(None)
    problems = []
    for key in opts[0::2]:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, part) and part not in node:
                problems.append(f"config key {key} does not exist")
                break
            node = node[part]
    return problems


def _check_python_c(code: str) -> List[str]:
    try:
        compile(code, "<doc>", "exec")
    except SyntaxError as e:
        return [f"python -c code does not compile: {e}"]
    problems = []
    for mod, names in re.findall(r"from ([\w.]+) import ([\w, ]+?)(?: as \w+)?(?:;|$)", code):
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            problems.append(f"python -c: cannot import {mod}: {e}")
            continue
        problems += [
            f"python -c: {mod} has no {n.strip()}" for n in names.split(",") if not hasattr(m, n.strip())
        ]
    return problems


def check_command(cmd: Command) -> List[str]:
    """Problems of one documented command (empty when it checks out)."""
    if cmd.tokens[1] == "-c":
        return _check_python_c(cmd.tokens[2] if len(cmd.tokens) > 2 else "")
    script = cmd.script
    if not os.path.isfile(os.path.join(ROOT, script)):
        return [f"{script}: no such file"]
    problems = [
        f"{t}: no such file"
        for t in cmd.tokens[2:]
        if _is_repo_path(t) and not os.path.exists(os.path.join(ROOT, t))
    ]
    target = FLAGS_OF.get(script, script)
    if target and target.endswith(".py"):
        problems += _check_flags(cmd, target) + _check_options(cmd, target)
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print every command found")
    args = p.parse_args(argv)
    cmds = collect_commands()
    bad = 0
    for cmd in cmds:
        problems = check_command(cmd)
        if args.list or problems:
            print(f"{cmd.source}: {cmd.shell()}")
        for prob in problems:
            print(f"    error: {prob}")
        bad += bool(problems)
    print(f"{len(cmds)} documented commands, {bad} with problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
