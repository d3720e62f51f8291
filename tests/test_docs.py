"""``make docs`` builds the API reference, and every reference in a docstring resolves.

pdoc turns a Sphinx role (``:class:`X```, ``:func:`f```, ``:mod:`m```, ...) or a name in single
backticks (reStructuredText's interpreted text, Sphinx's default role) into inline code, and links
it when the name resolves from where the docstring is. A name that does not resolve stays plain
``<code>`` in the HTML and pdoc says nothing, so the test looks for exactly that: every role and
single-backtick name of every docstring must come out linked. Double backticks are literals
(``stderr``, ``RMT_PROFILE``) and are not references.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import typing as T
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pdoc.doc
import pdoc.docstrings
import pytest

from regression_model_template.testing import clean_environ

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "regression_model_template"

ROLE = re.compile(r"(?::py)?:(?:mod|func|data|const|class|meth|attr|exc|obj):`[^`]+`")
LITERAL = re.compile(r"``.+?``", re.DOTALL)
INTERPRETED = re.compile(r"(?<![\w`])`(?P<name>[^`\s]+)`(?![`_])")
IDENTIFIER = re.compile(r"~?\.*[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:\(\))?")
WARNING = re.compile(r"^(?:Warn|[A-Z]\w*Warning): ", re.MULTILINE)
# pdoc evaluates annotations at run time: a NamedTuple's generated __init__ or a stub-only type
# (loguru.Logger) cannot be, and pdoc warns. Annotations are mypy --strict's job, not this test's.
ANNOTATION_WARNING = "Warn: Error parsing type annotation "
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


def _pdoc_command(output: Path) -> list[str]:
    """The pdoc command of ``make docs`` (the Makefile says which modules), into ``output``."""
    environ = clean_environ()
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        environ.pop(name, None)
    dry_run = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", "docs", f"DOCS={output}"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    command = next(line for line in dry_run.stdout.splitlines() if " -m pdoc " in line)
    # the Makefile runs .venv's python; the test runs pdoc with its own interpreter
    return [sys.executable, *shlex.split(command)[1:]]


class _UnlinkedCode(HTMLParser):
    """Unlinked inline ``<code>`` of each docstring in a pdoc page, by the id of its owner."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: dict[str, list[str]] = defaultdict(list)
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of every open element
        self._docstring: int | None = None  # depth of the docstring <div> we are in
        self._owner = ""
        self._code: list[str] | None = None  # text of the <code> we are in, None once it links
        self._in_code = False
        self._in_link = 0
        self._in_pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID:
            return
        attributes = dict(attrs)
        if self._docstring is None and tag == "div" and attributes.get("class") == "docstring":
            self._docstring = len(self._open)
            self._owner = next((id_ for _, id_ in reversed(self._open) if id_), "")
        self._open.append((tag, attributes.get("id")))
        if tag == "a":
            self._in_link += 1
            if self._in_code:
                self._code = None
        elif tag == "pre":
            self._in_pre += 1
        elif tag == "code" and self._docstring is not None:
            self._in_code = True
            self._code = None if self._in_link or self._in_pre else []

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or not any(open_tag == tag for open_tag, _ in self._open):
            return
        while self._open:
            open_tag, _ = self._open.pop()
            if open_tag == "a":
                self._in_link -= 1
            elif open_tag == "pre":
                self._in_pre -= 1
            elif open_tag == "code" and self._in_code:
                self._in_code = False
                if self._code is not None:
                    self.found[self._owner].append("".join(self._code))
                self._code = None
            if self._docstring is not None and len(self._open) == self._docstring:
                self._docstring = None
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        if self._in_code and self._code is not None:
            self._code.append(data)


def _references(docstring: str) -> list[tuple[str, str]]:
    """The references of a docstring: (as written, as pdoc renders it)."""
    refs = [(m.group(0), _rendered(m.group(0))) for m in ROLE.finditer(docstring)]
    rest = ROLE.sub(" ", LITERAL.sub(" ", docstring))
    refs += [
        (m.group(0), m.group("name"))
        for m in INTERPRETED.finditer(rest)
        if IDENTIFIER.fullmatch(m.group("name"))
    ]
    return refs


def _rendered(role: str) -> str:
    """What pdoc makes of a role: ``:func:`run``` -> ``run()`` (pdoc's own conversion)."""
    return pdoc.docstrings.rst(role, None).strip().strip("`")


def _where(doc: pdoc.doc.Doc[T.Any], written: str) -> str:
    """``file:line`` of ``written`` in the source of ``doc``."""
    path = Path(doc.source_file) if doc.source_file else None
    if path is None or not path.is_file():
        return doc.fullname
    lines = path.read_text().splitlines()
    first, last = doc.source_lines or (1, len(lines))
    hits = [n for n, line in enumerate(lines, 1) if written in line]
    inside = [n for n in hits if first <= n <= last]
    line = (inside or hits or [first])[0]
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def _modules() -> set[str]:
    """Every module of the package (pdoc never documents ``__main__``)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1].startswith("_"):
            continue
        names.add(".".join(parts))
    return names


@pytest.fixture(scope="module")
def api_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The API reference built as ``make docs`` builds it: (its folder, pdoc's stderr)."""
    output = tmp_path_factory.mktemp("api")
    result = subprocess.run(
        _pdoc_command(output),
        cwd=ROOT,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stderr


def test_every_module_has_a_page(api_reference: tuple[Path, str]) -> None:
    output, _ = api_reference
    pages = {
        ".".join(page.relative_to(output).with_suffix("").parts)
        for page in output.rglob("*.html")
        if page.name != "index.html"
    }

    missing = _modules() - pages
    assert not missing, f"no page for {sorted(missing)}: name them in the Makefile's DOC_MODULES"


def test_pdoc_builds_without_warnings(api_reference: tuple[Path, str]) -> None:
    _, stderr = api_reference
    starts = [m.start() for m in WARNING.finditer(stderr)]
    chunks = [stderr[a:b] for a, b in zip(starts, [*starts[1:], len(stderr)], strict=True)]
    other = stderr[: starts[0]] if starts else stderr

    unexpected = [c.strip() for c in chunks if not c.startswith(ANNOTATION_WARNING)]
    assert not other.strip() and not unexpected, other + "\n".join(unexpected)


def test_every_docstring_reference_resolves(api_reference: tuple[Path, str]) -> None:
    output, _ = api_reference
    broken: dict[str, set[str]] = defaultdict(set)
    for page in sorted(output.rglob("*.html")):
        if page.name == "index.html":
            continue
        parser = _UnlinkedCode()
        parser.feed(page.read_text())
        module = pdoc.doc.Module.from_name(".".join(page.relative_to(output).with_suffix("").parts))
        for owner, unlinked in parser.found.items():
            doc = module.get(owner) if owner else module
            assert doc is not None, f"{page.name}: #{owner} is not in {module.modulename}"
            for written, rendered in _references(doc.docstring):
                if rendered in unlinked:
                    where = _where(doc, written)
                    broken[f"{where}: {written} ({doc.fullname})"].add(page.name)

    assert not broken, "references pdoc cannot resolve (left as plain <code>):\n" + "\n".join(
        f"  {ref}, on {', '.join(sorted(pages))}" for ref, pages in sorted(broken.items())
    )
