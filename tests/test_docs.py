"""Links resolve: every anchor cited in the repo names a heading of its document, and every module,
attribute and path the docs name exists. A reader who follows a comment's citation lands on it."""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CITING = ["capsd", "tests", "bench", "docs", "etc", "systemd", ".ci", "README.md", "CHANGELOG.md", "pyproject.toml"]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# An anchor cited by document: "design.md" then "#" then the anchor (spelt apart so that this
# file cites nothing), in code comments, docstrings and markdown links alike. A document is named
# from the repository's root in code ("docs/design.md") and relative to the citing file in links.
CITATION = re.compile(r"((?:\.\./)?(?:docs/)?[\w-]+\.md)" + "#" + r"([\w-]+)")
SAME_DOCUMENT = re.compile(r"\]\(" + "#" + r"([\w-]+)\)")
# A relative link in a document: "](" then a path that is not a URL, up to an anchor or the end.
LINK = re.compile(r"\]\((?![a-z]+:|#)([^)#\s]+)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"(?:capsd|tests|bench)(?:\.[A-Za-z_]\w*)+")
RUN_MODULE = re.compile(r"python3? -m ((?:capsd|tests|bench)(?:\.\w+)+)")
REPO_PATH = re.compile(r"\.?[\w-]+(?:/[\w.-]+)*/(?:[\w.-]+)?|[\w-]+\.py")
# Code spans that look like `module.attr` but are not capsd's code: the status JSON's "memory"
# object and the cgroup's memory.* files.
NOT_CODE = ("memory.",)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than - and _ removed, spaces
    to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(document: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchor = github_anchor(heading[1])
            n = sum(a == anchor or re.fullmatch(re.escape(anchor) + r"-\d+", a) is not None for a in found)
            found.add(f"{anchor}-{n}" if n else anchor)  # GitHub numbers repeated headings
    return found


def citing_files() -> list[Path]:
    files = []
    for name in CITING:
        path = ROOT / name
        files += [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    return [f for f in files if "__pycache__" not in f.parts and f.suffix not in (".onnx", ".pyc")]


def test_github_anchor_keeps_underscores_and_hyphens() -> None:
    assert github_anchor("text_accu on the final frame") == "text_accu-on-the-final-frame"
    assert github_anchor("Error frames wait for the client's final frame") == (
        "error-frames-wait-for-the-clients-final-frame"
    )
    assert github_anchor("Changing the pool while it serves") == "changing-the-pool-while-it-serves"
    assert github_anchor("`capsctl status`: one row per slot") == "capsctl-status-one-row-per-slot"


def cited_document(citing: Path, name: str) -> Path:
    """The document a citation names: relative to the citing markdown file, else to the root."""
    relative = (citing.parent / name).resolve()
    return relative if citing.suffix == ".md" and relative.is_file() and ROOT in relative.parents else ROOT / name


def test_every_cited_anchor_names_a_heading() -> None:
    broken, checked = [], 0
    for path in citing_files():
        text = path.read_text(errors="replace")
        cited = [(cited_document(path, document), anchor) for document, anchor in CITATION.findall(text)]
        if path.suffix == ".md":
            cited += [(path, anchor) for anchor in SAME_DOCUMENT.findall(text)]
        broken += [
            f"{path.relative_to(ROOT)}: {d.relative_to(ROOT)}#{a}"
            for d, a in cited
            if not d.is_file() or a not in anchors(d)
        ]
        checked += len(cited)
    assert not broken, "\n".join(broken)
    assert checked > 50, checked  # the patterns still find the citations


def test_every_relative_link_in_the_docs_leads_to_a_file() -> None:
    broken, checked = [], 0
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            checked += 1
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
    assert checked > 10, checked


def resolves(dotted: str) -> bool:
    """A dotted name: the longest prefix that imports, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def capsd_module(name: str) -> str | None:
    """The module the docs mean by `front.x` (its file's stem) or `Front.x` (a class it defines)."""
    sources = sorted((ROOT / "capsd").rglob("*.py"))
    if name[0].isupper():
        matches = [p for p in sources if re.search(rf"^class {name}\b", p.read_text(), re.MULTILINE)]
        name_in_module = f".{name}"
    else:
        matches, name_in_module = [p for p in sources if p.stem == name], ""
    if len(matches) != 1:
        return None
    return ".".join(matches[0].relative_to(ROOT).with_suffix("").parts) + name_in_module


def test_every_module_attribute_and_path_the_docs_name_exists() -> None:
    missing, paths, names_checked = [], 0, 0
    for doc in DOCS:
        text = doc.read_text()
        names = set(RUN_MODULE.findall(text))
        for span in CODE_SPAN.findall(text):
            if DOTTED.fullmatch(span):
                names.add(span)
            elif REPO_PATH.fullmatch(span):
                paths += 1
                here = [ROOT, ROOT / "capsd", doc.parent]
                if not any((base / span).exists() for base in here) and not list(ROOT.rglob(span)):
                    missing.append(f"{doc.name}: path {span}")
            elif (short := re.fullmatch(r"(\w+)\.(\w+)", span)) and not span.startswith(NOT_CODE):
                module = capsd_module(short[1])
                if module:  # `front.CLOSE_TIMEOUT_S`, `Daemon.worker_exited`
                    names.add(f"{module}.{short[2]}")
        missing += [f"{doc.name}: {name}" for name in sorted(names) if not resolves(name)]
        names_checked += len(names)
    assert not missing, "\n".join(missing)
    assert paths > 20 and names_checked > 10, (paths, names_checked)
