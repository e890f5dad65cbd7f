"""Rewrite the README's example blocks with what the commands print today.

Each block of commands (``$ qplan ...`` lines) runs in a scratch folder, as on a 100-column
terminal (tests/test_readme.py checks the same). A command's output is shown whole, or, where the
README shows it in parts, as the lines from each ``@keep FIRST..LAST`` window given for that block
in WINDOWS (first lines, "...", then the window of each pattern). Run from the repository root:

    python tools/readme_examples.py          # rewrites README.md; review with git diff
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```\n(\$ qplan .*?)```", re.S)

# command prefix -> [(regex of the first line of a window, regex of its last line or None = to
# the end)]; the command's first output line is always shown. Commands not listed: whole output.
WINDOWS: dict[str, list[tuple[str, str | None]]] = {
    "qplan estimate": [(r"^│ saved activations", None)],
    "qplan suggest --model llama-3.1-70b --gpu a100-40gb-sxm": [
        (r"^│ optim ", r"^│ +│ +│ .*\)"), (r"^│ gpus ", r"│ per GPU"),
        (r"^Memory per GPU", None)],
    "qplan suggest --model llama-3.1-70b --gpu rtx-4090 --max-gpus": [
        (r"^note: \d+ GPUs: the fewest", r"^note: 8 GPUs")],
    "qplan suggest --model llama-3.1-70b --gpu rtx-4090 --gpus 2 --no-offload-params": [
        (r"^needs ", r"not sharded\)"), (r"^Nearest plans", None)],
    "qplan suggest --model llama-3.1-70b --gpu rtx-4090 --gpus 2": [
        (r"^│ gpus ", r"^└"), (r"^Memory per GPU", None)],
    "qplan check tests/fixtures/ecosystem/axolotl_qlora": [
        (r"^rtx-4090", r"^rtx-4090"), (r"^How qplan reads it", r"^PyTorch's default allocator"),
        (r"^peak ", None)],
    "qplan check tests/fixtures/ecosystem/seed_trl": [(r"^To run faster", None)],
    "qplan check train_trl": [(r"^(To fit, option 1|No edit)", None)],
}


def blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each example block of ``text`` as [(command, lines shown after it), ...]."""
    out = []
    for body in BLOCK.findall(text):
        steps: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            if line.startswith("$ qplan "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        out.append(steps)
    return out


@contextlib.contextmanager
def scratch():
    """A scratch folder to run a block in, as the current directory: ``tests/`` there is this
    checkout's, ``docs/`` an empty folder for the files the commands write."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tests").symlink_to(ROOT / "tests")
        (Path(tmp) / "docs").mkdir()
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(cwd)


def run(command: str) -> tuple[int, list[str]]:
    """(exit code, output lines) of ``qplan ...`` run in this process."""
    from click.testing import CliRunner

    from qplan.cli import cli

    r = CliRunner().invoke(cli, shlex.split(command)[1:])
    return r.exit_code, [line.rstrip() for line in r.output.splitlines()]


def select(command: str, out: list[str]) -> list[str]:
    spec = next((w for p, w in WINDOWS.items() if command.startswith(p)), None)
    if spec is None:
        return out
    shown, i = [out[0]], 1
    for first, last in spec:
        j = next((k for k in range(i, len(out)) if re.search(first, out[k])), None)
        if j is None:
            raise SystemExit(f"{command!r}: no line matches the window {first!r} in its "
                             "output:\n" + "\n".join(out))
        if j > i:
            shown.append("...")
        end = len(out) - 1 if last is None else next(
            k for k in range(j, len(out)) if re.search(last, out[k]))
        shown += out[j:end + 1]
        i = end + 1
    return shown


def main() -> int:
    os.environ["COLUMNS"] = "100"
    readme = ROOT / "README.md"
    text = readme.read_text()

    def rewrite(m: re.Match) -> str:
        lines = []
        with scratch() as tmp:
            for c, _ in blocks(m.group(0))[0]:
                out = run(c)[1]
                lines += [f"$ {c}"] + (select(c, out) if not c.startswith("qplan suggest")
                                        or "--save" not in c else [])
                for png in (tmp / "docs").glob("*.png"):  # the README's figure
                    (ROOT / "docs" / png.name).write_bytes(png.read_bytes())
        return "```\n" + "\n".join(lines) + "\n```"

    new = BLOCK.sub(rewrite, text)
    readme.write_text(new)
    print("README.md examples rewritten" if new != text else "README.md examples unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
