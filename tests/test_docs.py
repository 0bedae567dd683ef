"""The documented commands stay true: every distres command in the docs parses, and the marked
blocks run.

What is read: the fenced code blocks of README.md, docs/*.md and benchmarks/README.md.

- In a ``bash``/``sh``/``shell`` block every line is a command (``\\`` joins lines, ``#`` starts a
  comment, ``NAME="..."`` defines ``$NAME`` for the block's later lines). In any other block,
  only lines starting with ``$ `` are commands (a transcript: the rest is output).
- A command calls distres when it has ``-m distres.<tool>`` (python or torchrun),
  ``distres-<tool>``, or one of the scripts whose arguments go to distres.train (``sbatch
  slurm/train.sbatch``, ``slurm/train-cpu.sbatch``, ``launch/local.sh``, ``launch/multinode.sh``).

Every such command is parsed with the tool's own argparse parser (``distres.config.build_parser``
for train and autotune, ``build_parser`` of evaluate, predict, export and prepare); a training
command whose ``--config`` files exist in the repository is also resolved and validated by
``distres.config.parse_args``. A failure names the file, the line and the command.

Running: a block whose fence follows the line ``<!-- docs-test: run [FLAGS] -->`` is run, block
after block in the order above (README first), in one scratch folder that holds small stand-ins
for the folders the docs name (``pets/`` with train/ and val/, ``new_photos/``, a link to
``configs/``), with W&B off. FLAGS are appended to each training command of the block (so they
win over the block's own: ``--max-steps 2`` keeps a 50-step example short). ``python -m distres.*``
commands run in this process through the tool's ``main``; ``torchrun --standalone
--nproc_per_node N`` commands as N ranks forked from it (``tests.helpers.run_ranks``). Blocks
without the marker (GPUs, clusters, real data sets) are parsed only.

YAML blocks are configuration examples: their keys (in sections or flat) must be options.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, make_imagefolder, run_ranks

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
RUN_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*run(?P<flags>[^>]*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[\w+-]*)")
SHELL = {"bash", "sh", "shell", "zsh"}
TOOLS = ("train", "autotune", "evaluate", "predict", "export", "prepare")
TRAINING = {"train", "autotune"}
# Scripts that hand every argument after them to distres.train.
TRAIN_SCRIPTS = {"slurm/train.sbatch", "slurm/train-cpu.sbatch", "launch/local.sh", "launch/multinode.sh"}
# The sections of a --config file, and the one key that is not the flag's name.
SECTIONS = {"model", "finetune", "data", "augment", "optim", "run", "checkpoint", "guard", "dist", "observe", "tune"}
RENAMED = {"dataset": "data"}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    lines: list[tuple[int, str]]
    run_flags: list[str] | None  # None: not marked to run


@dataclass
class Command:
    path: Path
    line: int
    text: str
    tokens: list[str]
    tool: str | None = None  # the distres tool it calls, if any
    args: list[str] = field(default_factory=list)  # the tool's arguments
    launcher: list[str] = field(default_factory=list)  # torchrun's own arguments, when under torchrun

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}: {self.text}"


def read_blocks(path: Path) -> list[Block]:
    blocks, current, marker, previous = [], None, None, ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if current is None:
            m = FENCE.match(line)
            if m:
                flags = RUN_MARKER.match(previous)
                marker = shlex.split(flags["flags"]) if flags else None
                current = Block(path, number, m["info"].lower(), [], marker)
                current_fence = m["fence"]
            previous = line
        elif line.strip().startswith(current_fence[0] * len(current_fence)) and not line.strip().strip(
            current_fence[0]
        ):
            blocks.append(current)
            current, previous = None, line
        else:
            current.lines.append((number, line))
    assert current is None, f"{path.relative_to(REPO)}:{current.line}: unclosed code fence"
    return blocks


def _logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of each command, continuation lines joined."""
    transcript = block.info not in SHELL
    out, pending = [], None
    for number, raw in block.lines:
        line = raw.rstrip()
        if pending is None:
            if transcript:
                if not line.lstrip().startswith("$ "):
                    continue
                line = line.lstrip()[2:]
            pending = (number, "")
        start, text = pending
        if line.endswith("\\"):
            pending = (start, text + line[:-1] + " ")
            continue
        out.append((start, text + line))
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def _identify(cmd: Command) -> None:
    tokens = cmd.tokens
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    for i, tok in enumerate(tokens):
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("distres."):
            cmd.tool, cmd.args = tokens[i + 1].removeprefix("distres."), tokens[i + 2 :]
            first = Path(tokens[0]).name
            if first == "torchrun":
                cmd.launcher = tokens[1:i]
            elif i >= 2 and tokens[1] == "-m" and tokens[2] == "torch.distributed.run":
                cmd.launcher = tokens[3:i]
            return
        name = Path(tok).name
        if name.startswith("distres-"):
            cmd.tool, cmd.args = name.removeprefix("distres-"), tokens[i + 1 :]
            return
        if tok.removeprefix("./") in TRAIN_SCRIPTS:
            cmd.tool, cmd.args = "train", tokens[i + 1 :]
            cmd.launcher = ["<script>"]
            return


def block_commands(block: Block) -> list[Command]:
    if block.info not in SHELL and not any(ln.lstrip().startswith("$ ") for _, ln in block.lines):
        return []
    variables: dict[str, str] = {}
    commands = []
    for number, text in _logical_lines(block):
        expanded = re.sub(
            r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m[1], m[0]), text
        )  # only the block's own variables
        try:
            tokens = shlex.split(expanded, comments=True)
        except ValueError as e:
            pytest.fail(f"{block.path.relative_to(REPO)}:{number}: cannot split {text!r}: {e}")
        if not tokens:
            continue
        if len(tokens) == 1 and (m := re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", tokens[0])):
            variables[m[1]] = m[2]
            continue
        cmd = Command(block.path, number, " ".join(text.split()), tokens)
        _identify(cmd)
        commands.append(cmd)
    return commands


BLOCKS = [b for path in DOCS for b in read_blocks(path)]
DISTRES_COMMANDS = [c for b in BLOCKS for c in block_commands(b) if c.tool]


def parser_for(tool: str):
    if tool not in TOOLS:
        return None
    if tool in TRAINING:
        from distres.config import build_parser

        return build_parser()
    return importlib.import_module(f"distres.{tool}").build_parser()


def check_parses(cmd: Command) -> None:
    """Parse cmd's arguments as the tool would; fail naming the doc line."""
    from distres.errors import UserError

    parser = parser_for(cmd.tool)
    if parser is None:
        pytest.fail(f"{cmd.where}\n  distres has no tool '{cmd.tool}' (one of {', '.join(TOOLS)})")
    try:
        parser.parse_args(cmd.args)
    except (UserError, SystemExit) as e:
        pytest.fail(f"{cmd.where}\n  {e}")
    configs = [cmd.args[i + 1] for i, a in enumerate(cmd.args[:-1]) if a == "--config"]
    if cmd.tool in TRAINING and all((REPO / c).is_file() for c in configs):
        from distres import config

        cwd = os.getcwd()
        os.chdir(REPO)  # the docs' paths (configs/...) are relative to the repository root
        try:
            config.parse_args(cmd.args)
        except (UserError, SystemExit) as e:
            pytest.fail(f"{cmd.where}\n  {e}")
        finally:
            os.chdir(cwd)


def test_docs_have_commands_and_markers():
    """The extraction finds what the docs hold: a guard against a parser that silently finds nothing."""
    assert len(DISTRES_COMMANDS) >= 20, [c.where for c in DISTRES_COMMANDS]
    tools = {c.tool for c in DISTRES_COMMANDS}
    assert {"train", "evaluate", "predict", "export", "prepare", "autotune"} <= tools
    assert any(c.launcher and c.launcher != ["<script>"] for c in DISTRES_COMMANDS)  # torchrun
    assert sum(b.run_flags is not None for b in BLOCKS) >= 3


@pytest.mark.parametrize("cmd", DISTRES_COMMANDS, ids=lambda c: f"{c.path.relative_to(REPO)}:{c.line}")
def test_documented_command_parses(cmd):
    check_parses(cmd)


def test_a_broken_command_fails_naming_file_and_line():
    """The check can fail: a flag that does not exist and a missing required argument."""
    doc = REPO / "README.md"
    for text in (
        "python -m distres.train --data synthetic --no-such-flag 3",
        "torchrun --standalone --nproc_per_node 2 -m distres.train --arch resnet9",
        "python -m distres.export --checkpoint x.pt --format onnx",
    ):
        cmd = Command(doc, 7, text, shlex.split(text))
        _identify(cmd)
        with pytest.raises(pytest.fail.Exception, match=r"README\.md:7: "):
            check_parses(cmd)


def _yaml_keys_are_options(block: Block) -> list[str]:
    from distres.config import FIELDS

    data = yaml.safe_load("\n".join(line for _, line in block.lines))
    if not isinstance(data, dict):
        return [f"not a mapping: {data!r}"]
    wrong = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            wrong += [f"{key}.{k}" for k in value if RENAMED.get(k, k).replace("-", "_") not in FIELDS]
        elif str(key).replace("-", "_") not in FIELDS:
            wrong.append(str(key))
    return wrong


YAML_BLOCKS = [b for b in BLOCKS if b.info in ("yaml", "yml")]


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=lambda b: f"{b.path.relative_to(REPO)}:{b.line}")
def test_documented_config_keys_are_options(block):
    wrong = _yaml_keys_are_options(block)
    assert not wrong, f"{block.path.relative_to(REPO)}:{block.line}: not options: {', '.join(wrong)}"


# --- running the marked blocks --------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The folder the runnable blocks run in, with stand-ins for the folders the docs name."""
    root = tmp_path_factory.mktemp("docs")
    make_imagefolder(root / "pets", {"train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}})
    make_imagefolder(root / "photos", {"new": {"x": 2}}, seed=1)
    (root / "photos" / "new" / "x").rename(root / "new_photos")
    (root / "configs").symlink_to(REPO / "configs")
    return root


def run_command(cmd: Command, extra: list[str], cwd: Path) -> None:
    args = [*cmd.args, *(extra if cmd.tool in TRAINING else [])]
    if cmd.launcher == ["<script>"] or cmd.tool is None:
        pytest.fail(f"{cmd.where}\n  a block marked to run may hold only python -m distres.* and torchrun commands")
    main = importlib.import_module(f"distres.{cmd.tool}").main
    if cmd.launcher:
        ran_as = ["torchrun", *cmd.launcher, "-m", f"distres.{cmd.tool}", *args]
        r = run_ranks(main, args, _one_node_processes(cmd), timeout=240, env={"WANDB_MODE": "disabled"}, cwd=cwd)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("distres: error")]
        code, output = r.returncode, "\n".join(errors) or (r.stdout + r.stderr)[-3000:]
    else:
        code, output = main(args), "(its output is above)"
        ran_as = ["python", "-m", f"distres.{cmd.tool}", *args]
    if code != 0:
        pytest.fail(f"{cmd.where}\n  ran as: {shlex.join(ran_as)}\n  exit status {code}\n{output}")


def _one_node_processes(cmd: Command) -> int:
    """N of a marked block's ``torchrun --standalone --nproc_per_node N``: the one torchrun form
    that runs here, as N forked ranks (``run_ranks``; torchrun itself is tested with distres.train)."""
    launcher = " ".join(cmd.launcher)
    m = re.fullmatch(r"--standalone --nproc[_-]per[_-]node[ =](\d+)", launcher)
    if m is None:
        pytest.fail(
            f"{cmd.where}\n  a marked block's torchrun takes --standalone --nproc_per_node N only, not {launcher}"
        )
    return int(m[1])


def test_marked_blocks_run(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    ran, missing = 0, []
    for block in BLOCKS:
        if block.run_flags is None:
            continue
        for cmd in block_commands(block):
            if cmd.tool == "export" and "onnx" in cmd.args and importlib.util.find_spec("onnxruntime") is None:
                missing.append(cmd.where)  # the optional `export` extra, as in tests/test_inference.py
                continue
            run_command(cmd, block.run_flags, scratch)
            ran += 1
    assert ran >= 4
    if missing:
        pytest.skip("ONNX Runtime is not installed (pip install -e '.[export]'); not run: " + "; ".join(missing))


# --- links between the pages ----------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(_anchor(m[1]))
    return found


def test_links_between_pages_resolve():
    """Every relative link of the docs names a file that exists and, with #, one of its headings."""
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
