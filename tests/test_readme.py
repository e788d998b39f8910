"""README.md is what users copy from: every python code block in it runs here, as a user would run
it, and the `python -m lowbit ...` command lines it shows are accepted by the command line.

Each block runs in a fresh interpreter (`sys.executable`), in an empty scratch directory (so
`import lowbit` is the installed package, never a source tree in the working directory), offline
(HF_HUB_OFFLINE=1), with a timeout. An HTML comment on the line(s) right above a block says what
the block needs, visibly in the README:

    <!-- readme-test: fixture tiny-llama at path/to/hf-model -->
        the test first writes a float Llama checkpoint with random weights (2 layers, hidden
        128; safetensors) at that path of the scratch directory. `tiny-llama-gptq`: the same
        model as a 4-bit GPTQ checkpoint (group size 32, act-order), in GPTQ's published layout.
    <!-- readme-test: skip (REASON) -->
        not run here, reported as a skip with REASON. The reason "needs a CUDA device; runs on the
        lent GPU machine" (the suite's GPU marker) skips only where torch sees no CUDA device: the
        GPU machine runs those blocks.

An unknown directive fails the test rather than skipping the block.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
CUDA_REASON = "needs a CUDA device; runs on the lent GPU machine"
TIMEOUT_S = 180  # per block; they take 2-7 s each on an idle 2-core machine
# Text a block must not print on stderr, whatever the block: each of these was printed once by
# lowbit itself while running the README (a plug-in registration failing on an import cycle; a
# config attribute read that Transformers 5 reports as deprecated).
FORBIDDEN_STDERR = (
    "lowbit: could not register",
    "`torch_dtype` is deprecated",
)

_FENCE = re.compile(r"^```python\n(.*?)^```[ \t]*$", re.M | re.S)
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
_FIXTURE = re.compile(r"^fixture\s+(\S+)\s+at\s+(\S+)$")
_SKIP = re.compile(r"^skip\s+\((.+)\)$")


def _blocks(text: str) -> list:
    """pytest params, one per python block: (line, code, fixtures {path: kind}, skip reason,
    unknown directives)."""
    params = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].splitlines()
        fixtures, skip, errors = {}, None, []
        # The comments stacked right above the fence (no blank line between) belong to the block.
        while before and _DIRECTIVE.match(before[-1]):
            body = _DIRECTIVE.match(before.pop()).group(1)
            if f := _FIXTURE.match(body):
                fixtures[f.group(2)] = f.group(1)
            elif s := _SKIP.match(body):
                skip = s.group(1)
            else:
                errors.append(body)
        params.append(
            pytest.param(line, m.group(1), fixtures, skip, errors, id=f"README.md:{line}")
        )
    return params


BLOCKS = _blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_the_blocks_this_test_expects():
    # A fence this test failed to recognise would silently leave an example untested.
    text = README.read_text(encoding="utf-8")
    assert len(BLOCKS) == text.count("\n```python\n") >= 7


def test_directives_are_read_as_documented():
    text = (
        "Intro\n\n```python\nplain()\n```\n\n"
        "<!-- readme-test: skip (needs a CUDA device; runs on the lent GPU machine) -->\n"
        "```python\ngpu()\n```\n"
        "<!-- readme-test: fixture tiny-llama at path/to/a -->\n"
        "<!-- readme-test: fixture tiny-llama-gptq at path/to/b -->\n"
        "```python\nboth()\n```\n"
        "<!-- readme-test: skip (typo) -->\n\n```python\nnot_skipped()\n```\n"
        "<!-- readme-test: skipp (typo) -->\n```python\nunknown()\n```\n"
        "```bash\nnot_python\n```\n"
    )
    got = [p.values for p in _blocks(text)]
    assert [(code, fixtures, skip, errors) for _, code, fixtures, skip, errors in got] == [
        ("plain()\n", {}, None, []),
        ("gpu()\n", {}, CUDA_REASON, []),
        ("both()\n", {"path/to/a": "tiny-llama", "path/to/b": "tiny-llama-gptq"}, None, []),
        ("not_skipped()\n", {}, None, []),  # a blank line detaches the comment
        ("unknown()\n", {}, None, ["skipp (typo)"]),
    ]
    assert [line for line, *_ in got] == [3, 8, 13, 18, 22]


# ---- fixtures the blocks name -------------------------------------------------------------------


def _tiny_llama(path: Path) -> None:
    import _helpers_formats as H

    H.tiny_llama().save_pretrained(path)


def _tiny_llama_gptq(path: Path) -> None:
    import _helpers_formats as H

    H.write_gptq(H.tiny_llama(), path, bits=4, group_size=32, act_order=True, zero_groups=False)


FIXTURE_WRITERS = {"tiny-llama": _tiny_llama, "tiny-llama-gptq": _tiny_llama_gptq}


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
    # PYTHONPATH stays: tools/gpu_run.sh may put lowbit (a plain CMake build) and its baselines
    # there. The scratch working directory and the script's own directory hold no lowbit sources.
    return env


def _problem(fixtures, skip, errors) -> str | None:
    if errors:
        return f"unknown readme-test directive(s) {errors}"
    unknown = set(fixtures.values()) - set(FIXTURE_WRITERS)
    if unknown:
        return f"unknown fixture(s) {sorted(unknown)}"
    bad = [p for p in fixtures if Path(p).is_absolute() or ".." in Path(p).parts]
    if bad:
        return f"fixture paths must stay inside the scratch directory: {bad}"
    return None


def _skipped(skip) -> bool:
    return skip is not None and not (skip == CUDA_REASON and torch.cuda.is_available())


def _run_block(line: int, code: str, fixtures: dict, made: dict, tmp: Path):
    """(exit status, stderr) of one block run as a script from an empty scratch directory."""
    scratch = tmp / "scratch"
    scratch.mkdir()
    for rel, kind in fixtures.items():
        shutil.copytree(made[kind], scratch / rel)
    script = tmp / f"readme_line_{line}.py"
    script.write_text(code, encoding="utf-8")
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=scratch,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return None, f"the block ran longer than {TIMEOUT_S} s"
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory):
    """Every runnable block, started together two at a time (this suite's machine has 2 cores, and
    each block spends most of its time importing), each in its own scratch directory; the tests
    below wait for their own block. The fixtures the blocks name are written first, once each."""
    runnable = [
        p.values for p in BLOCKS if _problem(*p.values[2:]) is None and not _skipped(p.values[3])
    ]
    root = tmp_path_factory.mktemp("readme-fixtures")
    made = {}
    for kind in sorted({k for _, _, fixtures, _, _ in runnable for k in fixtures.values()}):
        made[kind] = root / kind
        FIXTURE_WRITERS[kind](made[kind])
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {
        line: pool.submit(_run_block, line, code, fixtures, made, tmp_path_factory.mktemp("block"))
        for line, code, fixtures, _, _ in runnable
    }
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("line, code, fixtures, skip, errors", BLOCKS)
def test_readme_block_runs(line, code, fixtures, skip, errors, block_runs):
    problem = _problem(fixtures, skip, errors)
    assert problem is None, f"README.md:{line}: {problem}"
    if _skipped(skip):
        pytest.skip(skip)
    returncode, stderr = block_runs[line].result()
    assert returncode == 0, (
        f"README.md:{line}: the block failed (exit {returncode}):\n{stderr[-4000:]}"
    )
    for text in FORBIDDEN_STDERR:
        assert text not in stderr, f"README.md:{line}: stderr says {text!r}:\n{stderr}"


# ---- command lines ------------------------------------------------------------------------------

_COMMAND = re.compile(r"`python -m lowbit ([^`]*)`")


def _readme_commands() -> list[str]:
    """Every `python -m lowbit ...` in inline code (one may wrap over a line break)."""
    text = README.read_text("utf-8")
    return sorted(set(" ".join(m.group(1).split()) for m in _COMMAND.finditer(text)))


def _argv(command: str) -> list[str]:
    """A README command line as argv: `[--quick]` is optional (checked present), `DIR` and other
    upper-case words are placeholders (given a value), `a | b` lists commands."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    return [w for w in words if w != "..."]


def test_readme_command_lines_parse():
    from lowbit import bench
    from lowbit.cli.main import build_parser

    commands = _readme_commands()
    assert len(commands) >= 5, commands
    parser = build_parser()
    subcommands = set(parser._subparsers._group_actions[0].choices)
    for command in commands:
        if "|" in command:  # the list of commands in the overview
            listed = {w.strip() for w in command.split("|")}
            assert listed == subcommands, (command, subcommands)
            continue
        argv = _argv(command)
        assert argv[0] in subcommands, command
        if argv[0] == "bench":
            # lowbit.bench has its own parser; --help proves nothing, so parse without running:
            # an unknown option or bad choice exits with status 2 before any benchmark starts.
            _parse_bench(bench, argv[1:], command)
            continue
        args, extra = parser.parse_known_args(argv)
        assert not extra and args.command == argv[0], (command, extra)


def _parse_bench(bench, argv, command):
    import argparse

    seen = {}
    parse_args = argparse.ArgumentParser.parse_args

    def fake_parse(self, args=None, namespace=None):
        seen["args"] = parse_args(self, args, namespace)
        raise SystemExit(0)  # stop before any benchmark runs

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(argparse.ArgumentParser, "parse_args", fake_parse)
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
    finally:
        mp.undo()
    assert exit_info.value.code == 0 and "args" in seen, command


def test_readme_env_command_says_what_the_readme_promises():
    # "`python -m lowbit env` shows the active one" (CPU kernels) and "lists the formats and which
    # of those libraries happen to be installed".
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit", "env"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**_env(), "LOWBIT_CPU_ISA": "generic"},
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"lowbit cpu kernels\s+generic\b", out), out
    for fmt in ("gptq", "awq", "compressed-tensors", "hqq"):
        assert re.search(rf"^\s+{fmt}\s", out, re.M), (fmt, out)
    assert "format libraries" in out and "hqq" in out.split("format libraries")[1], out


# ---- names and paths the prose points to --------------------------------------------------------

_NAME = re.compile(r"`[^`]*?\b((?:torch\.ops\.)?lowbit(?:\.[A-Za-z_]\w*)+)")
_REFERENCE_NAME = re.compile(r"`(reference\.[A-Za-z_]\w*)")
# repository paths; `lowbit/...` is the package's path, under python/
_PATH = re.compile(
    r"(?<![\w./])((?:tests|benchmarks|tools|csrc|python|lowbit|\.ci)/[\w./*-]*[\w*/])"
)

_RESOLVE = """
import importlib, sys
import torch, lowbit

bad = []
for name in sys.argv[1:]:
    try:
        eval(name)  # reachable after `import lowbit`
        continue
    except AttributeError:
        pass
    parts = name.split(".")
    # Otherwise the user imports a public submodule first (`import lowbit.integrations.peft`);
    # a private one (lowbit._x) that the README names must be reachable without that.
    for i in range(len(parts), 1, -1):
        module = ".".join(parts[:i])
        if any(p.startswith("_") for p in parts[1:i]):
            continue
        try:
            obj = importlib.import_module(module)
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            continue
        break
    else:
        bad.append(name)
print("\\n".join(bad))
"""


def test_readme_names_exist():
    text = README.read_text("utf-8")
    names = set(_NAME.findall(text)) | {"lowbit." + n for n in _REFERENCE_NAME.findall(text)}
    assert len(names) >= 15, names
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE, *sorted(names)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"names in README.md that do not resolve:\n{proc.stdout}"


def test_readme_paths_exist():
    root = README.parent
    paths = set(_PATH.findall(README.read_text("utf-8")))
    assert len(paths) >= 20, paths

    def exists(path: str) -> bool:
        if path.startswith("lowbit/"):
            path = "python/" + path
        if (root / path).exists():
            return True
        # a pattern, as shell globs or git pathspecs (where `*` also matches `/`) read it
        top = root / path.split("/")[0]
        files = (f.relative_to(root).as_posix() for f in top.rglob("*"))
        return any(fnmatch.fnmatch(f, path) for f in files)

    missing = [p for p in sorted(paths) if not exists(p)]
    assert not missing, f"paths in README.md that are not in the repository: {missing}"
