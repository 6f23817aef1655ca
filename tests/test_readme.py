"""Every example in README.md and docs/*.md runs: each fenced block is a test.

- ```python blocks run as a script, ```bash / ```sh blocks with `bash -euo pipefail`, each in a fresh folder
  holding `model.gguf` (the shipped demo model, standing in for "your MoE GGUF") and `.venv` (this checkout's),
  with this checkout's `.venv/bin` first on PATH (`moe-gguf ...` is the installed command).
- ```toml blocks must parse.
- A block that cannot run here is marked in the markdown by an HTML comment on the line before its fence,
  `<!-- skip: why -->` (a GPU, several machines, an interactive UI, a long job); the test is skipped with that
  reason. Blocks without a language (command output, synopses) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "toml": "toml"}
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)\s*$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<why>.*?)\s*-->\s*$")
TIMEOUT = int(os.environ.get("MOE_GGUF_README_TIMEOUT", "600"))


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}-{self.lang}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the skip reason given before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m["fence"], m["lang"].lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if j >= len(lines):
            raise ValueError(f"{path}:{start + 1}: code block never closed")
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = _SKIP.match(prev)
        indent = len(m["indent"])
        code = "\n".join(line[indent:] for line in lines[start + 1:j]) + "\n"
        out.append(Block(path, start + 1, lang, code, skip["why"] if skip else None))
        i = j + 1
    return out


ALL = [b for p in DOCS for b in blocks(p) if b.lang in RUN]


def test_the_collector_finds_the_examples():
    ids = [b.id for b in ALL]
    assert any(b.lang == "python" and "MoEModel" in b.code for b in ALL), ids
    assert any(b.lang == "bash" and "moe-gguf probe" in b.code and not b.skip for b in ALL), ids
    for b in ALL:  # a skip must say why
        assert b.skip is None or b.skip.strip(), b.id


def test_skip_markers_are_parsed(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n\n<!-- skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n```python\nprint(1)\n```\n")
    a, b = blocks(md)
    assert (a.lang, a.skip, a.code, a.line) == ("bash", "needs a GPU", "nvidia-smi\n", 4)
    assert (b.lang, b.skip, b.code) == ("python", None, "print(1)\n")


@pytest.fixture
def workdir(tmp_path) -> Path:
    from moe_gguf.demo.model import default_model_path

    (tmp_path / "model.gguf").symlink_to(default_model_path())
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("MOE_GGUF_DATA_DIR", str(Path(env.get("TMPDIR", "/tmp")) / "moe-gguf-readme-data"))
    return env


@pytest.mark.native
@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_example_runs(block: Block, workdir: Path):
    if block.skip:
        pytest.skip(block.skip)
    if RUN[block.lang] == "toml":
        tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
        tomllib.loads(block.code)
        return
    script = workdir / ("example.py" if RUN[block.lang] == "python" else "example.sh")
    script.write_text(block.code)
    cmd = [sys.executable, str(script)] if RUN[block.lang] == "python" else ["bash", "-euo", "pipefail", str(script)]
    r = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{block.id} failed ({r.returncode}):\n{block.code}\n--- stdout\n{r.stdout[-3000:]}\n" \
                              f"--- stderr\n{r.stderr[-3000:]}"
