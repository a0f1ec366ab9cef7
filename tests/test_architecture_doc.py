"""docs/ARCHITECTURE.md stays true: every file or folder it names in backticks exists.

Checked: each backticked name with a slash that looks like a path in the repository
(``node/scp.py``, ``worker/writers/``, ``docker/Dockerfile``), outside the code blocks and without
placeholders (``<storage_dir>/audit.jsonl`` names a place at run time, not in the repository);
in the diagrams, every module or package folder of the code they name.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_BACKTICKED = re.compile(r"`([^`\s]+)`")
_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*/?$")
_TOP = {"config", "contract", "node", "worker", "training", "pleura", "benchmarks", "tests", "docker", "docs"}
# In the diagrams: a module or a package folder of the code, as `node/scp.py` or `node/ledger/`.
_IN_DIAGRAM = re.compile(r"(?<![\w/<.])((?:config|contract|node|worker|training|pleura|benchmarks)/[A-Za-z0-9_/]*?(?:\.py\b|/))")


def named_paths(text: str) -> list[str]:
    """The repository paths named in backticks in ``text``, and the modules and package folders
    its diagrams (code blocks) name."""
    found = [name for block in _FENCE.findall(text) for name in _IN_DIAGRAM.findall(block)]
    prose = _FENCE.sub("", text)
    for name in _BACKTICKED.findall(prose):
        if "/" in name and _PATH.match(name) and name.split("/")[0] in _TOP:
            found.append(name)
    return found


def test_every_path_in_the_architecture_doc_exists():
    paths = named_paths(DOC.read_text(encoding="utf-8"))
    assert len(paths) > 50, paths  # the doc names the code: a change that lost them shows here
    missing = sorted({path for path in paths if not (REPO / path).exists()})
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_the_check_sees_paths_and_skips_placeholders_and_code_blocks():
    text = "`node/scp.py`, `worker/writers/`, `<storage_dir>/audit.jsonl`, `Ledger`\n```\nnode/gone.py  x/node/y.py\n```\n"
    assert named_paths(text) == ["node/gone.py", "node/scp.py", "worker/writers/"]
