"""The documentation cannot drift from the code.

* Every fenced ``python`` block of ``docs/*.md`` (and ``README.md``) runs: the blocks of one
  page in order, in one namespace, in a temporary working directory. A block whose first
  line is ``# skip-test: <reason>`` is not run, and is reported as skipped with its reason.
* Every ``cellkit ...`` command line in a ``bash`` block parses with cellkit's own parser,
  and the command line page names every option of every command.
* ``mkdocs build --strict`` passes (skipped, with the reason, when mkdocs is not installed:
  ``pip install -e ".[docs]"``).
* Every public module has an API page, every name a docstring documents as a parameter is a
  parameter, and the pictures exist and stay small.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SKIP_MARK = "# skip-test:"
PLUGIN_MARK = "# my_plugins.py"
MAX_IMAGE_BYTES = 300_000


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def skip_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(SKIP_MARK):].strip() or "no reason given" if first.startswith(SKIP_MARK) else None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their language and line number."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        language = match["info"].strip().split(" ")[0].lstrip(".").lower() if match["info"].strip() else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and set(closing) == {fence[0]}:
                break
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        else:
            raise AssertionError(f"{path.name}:{start + 1}: unclosed code fence")
        blocks.append(Block(_page_name(path), start + 1, language, textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return blocks


def _page_name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def pages() -> list[Path]:
    found = sorted(DOCS.glob("*.md"))
    readme = REPO / "README.md"
    return found + ([readme] if readme.is_file() else [])


def python_pages() -> list[Path]:
    return [p for p in pages() if any(b.language in ("python", "py") for b in fenced_blocks(p))]


def skipped_blocks() -> list[Block]:
    return [
        b for p in pages() for b in fenced_blocks(p) if b.language in ("python", "py") and b.skip_reason is not None
    ]


# --------------------------------------------------------------------------- python snippets


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run in an empty folder, with the repository importable and a non-interactive matplotlib."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


@pytest.mark.parametrize("page", python_pages(), ids=_page_name)
def test_python_blocks_run(page: Path, in_tmp_dir) -> None:
    """Run every python block of a page, in order, in one namespace."""
    import warnings

    import torch

    import cellkit.registry as registries

    blocks = [b for b in fenced_blocks(page) if b.language in ("python", "py") and b.skip_reason is None]
    kinds = [registries.MASKS, registries.LOSSES, registries.ENCODERS, registries.DECODERS, registries.POSTPROCESSORS]
    before = {id(r): set(r.names()) for r in kinds}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests run two workers on two cores
    namespace: dict = {"__name__": "__docs__"}
    try:
        for block in blocks:
            code = compile(block.code, f"{block} (python block)", "exec")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. the 4 half-transparent EndoNuke tiles
                    exec(code, namespace)
            except Exception as err:
                raise AssertionError(f"the python block at {block} failed: {type(err).__name__}: {err}") from err
    finally:
        torch.set_num_threads(threads)
        for r in kinds:  # a page may register plug-ins: leave the registries as they were
            for name in set(r.names()) - before[id(r)]:
                r.unregister(name)


@pytest.mark.parametrize("block", skipped_blocks() or [None], ids=str)
def test_skipped_python_blocks_say_why(block: Block | None) -> None:
    """Report each ``# skip-test:`` block with its reason (shown by ``pytest -ra``)."""
    if block is None:
        return
    pytest.skip(f"{block}: {block.skip_reason}")


def test_fence_parser_reads_indented_and_marked_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n!!! note\n    ```python\n    # skip-test: needs a GPU\n    y = 2\n    ```\n"
        "\n````bash\ncellkit --version\n````\n"
    )
    blocks = fenced_blocks(page)
    assert [(b.language, b.line) for b in blocks] == [("python", 3), ("python", 8), ("bash", 13)]
    assert blocks[0].code == "x = 1\n" and blocks[0].skip_reason is None
    assert blocks[1].skip_reason == "needs a GPU" and blocks[1].code.startswith("# skip-test")


# --------------------------------------------------------------------------- plug-in page


def test_plugins_page_passes_the_contract_tests(tmp_path: Path) -> None:
    """The plug-ins of docs/plugins.md pass cellkit's contract tests, run as the page says."""
    blocks = [b for b in fenced_blocks(DOCS / "plugins.md") if b.code.startswith(PLUGIN_MARK)]
    assert len(blocks) == 2, "plugins.md should have the two '# my_plugins.py' blocks"
    (tmp_path / "my_plugins.py").write_text("\n".join(b.code for b in blocks))
    commands = [
        shlex.split(line)
        for b in fenced_blocks(DOCS / "plugins.md")
        if b.language == "bash"
        for line in b.code.replace("\\\n", " ").splitlines()  # a command wrapped with backslashes
        if "-p my_plugins" in line
    ]
    assert len(commands) == 1, "plugins.md should show one pytest command with -p my_plugins"
    args = [a if not a.startswith("tests/") else str(REPO / a) for a in commands[0]]
    assert args[:3] == ["python", "-m", "pytest"], args
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, *args[1:], "-v", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Both plug-ins were collected and tested by the contract tests.
    assert "test_contract_output[class_circle] PASSED" in out, out[-2000:]
    assert "follows_the_contract[focal] PASSED" in out, out[-2000:]


# --------------------------------------------------------------------------- command lines


def _cellkit_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in pages():
        for block in fenced_blocks(page):
            if block.language not in ("bash", "sh", "shell", "console"):
                continue
            for line in block.code.replace("\\\n", " ").splitlines():
                line = line.strip().removeprefix("$ ")
                if line.startswith("cellkit ") or line == "cellkit":
                    found.append((str(block), shlex.split(line, comments=True)[1:]))
    return found


def test_documented_command_lines_parse() -> None:
    """Every ``cellkit ...`` line of a bash block is a valid command line."""
    from cellkit.cli import build_parser

    commands = _cellkit_commands()
    assert len(commands) >= 3
    for where, argv in commands:
        if any(a in ("-h", "--help", "--version") for a in argv):
            continue
        try:
            build_parser().parse_args(argv)
        except (Exception, SystemExit) as err:  # noqa: BLE001  the parser raises its own errors
            raise AssertionError(f"{where}: 'cellkit {shlex.join(argv)}' does not parse: {err}") from err


def test_cli_page_names_every_option() -> None:
    import argparse

    from cellkit.cli import build_parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    missing = [o for a in parser._actions for o in a.option_strings if o not in text and o not in ("-h",)]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, subparser in sub.choices.items():
        if f"cellkit {command}" not in text:
            missing.append(f"cellkit {command}")
        for action in subparser._actions:
            names = action.option_strings or [action.metavar or action.dest]
            missing += [f"{command} {n}" for n in names if n not in text and n != "-h"]
    assert not missing, f"docs/cli.md does not mention: {missing}"


# --------------------------------------------------------------------------- site


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as ``mkdocs build --strict`` writes it (built once for the tests below)."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if not _has(m)]
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    problems = "\n".join(line for line in out.splitlines() if "WARNING" in line or "ERROR" in line)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{problems or out[-4000:]}"
    return site


def test_mkdocs_build_strict(built_site: Path) -> None:
    assert (built_site / "index.html").is_file()
    assert (built_site / "api" / "losses" / "index.html").is_file()


#: Markup that means a docstring or page was written for Sphinx, not for this site: it shows
#: up literally in the browser. Each pattern runs on the text of a page (tags removed).
RAW_MARKUP = {
    "RST role": re.compile(r":(?:py:)?(?:func|mod|class|meth|attr|data|obj|exc|math|ref|term|doc|const):(?=[`\s]|$)"),
    "RST directive": re.compile(r"(?m)^\s*\.\. [a-z][a-z-]*::"),
    "RST table rule": re.compile(r"(?m)^\s*={3,}(?:\s+={3,})+\s*$"),
    "RST literal marker": re.compile(r"(?m)(?<!:)::\s*$"),
    "RST double backticks": re.compile(r"``"),
    "unrendered math": re.compile(r"\$\$|(?<![\w$])\$[^$\s][^$]*\$(?![\w$])"),
}


def _page_text(html: str) -> tuple[str, str]:
    """(the text of the page's article without code blocks, the article's HTML)."""
    m = re.search(r"<article[^>]*>(.*)</article>", html, flags=re.S)
    article = m.group(1) if m else html
    prose = re.sub(r"<pre[^>]*>.*?</pre>", "\n", article, flags=re.S)  # code blocks may show anything
    prose = re.sub(r"<code[^>]*>.*?</code>", " ", prose, flags=re.S)
    prose = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', " ", prose, flags=re.S)
    prose = re.sub(r"<(br|/p|/li|/div|/h\d|/tr|/td|/th)[^>]*>", "\n", prose)
    import html as html_lib

    return html_lib.unescape(re.sub(r"<[^>]+>", "", prose)), article


def raw_markup(html: str) -> list[str]:
    """What of ``html`` (one built page) would show as raw markup: ``["kind: excerpt", ...]``."""
    text, article = _page_text(html)
    found = []
    for kind, pattern in RAW_MARKUP.items():
        for m in pattern.finditer(text):
            start = max(0, m.start() - 40)
            found.append(f"{kind}: ...{text[start:m.end() + 40].strip()!r}...")
    # Doctest lines that Markdown turned into nested quotes instead of a code block.
    if re.search(r"<blockquote>\s*<blockquote>\s*<blockquote>", article):
        found.append("'>>>' lines rendered as nested quotes (fence them or use an Examples: section)")
    # A code line a 1280-px screen clips (the content column shows about 78 characters of code).
    for block in re.findall(r"<pre[^>]*>(.*?)</pre>", article, flags=re.S):
        import html as html_lib

        for line in html_lib.unescape(re.sub(r"<[^>]+>", "", block)).splitlines():
            if len(line.rstrip()) > CODE_LINE_MAX:
                found.append(f"code line of {len(line.rstrip())} characters (> {CODE_LINE_MAX}): {line.strip()[:60]!r}")
    return found


#: The widest code line the content column shows without a scroll bar on a 1280-px screen.
CODE_LINE_MAX = 78


def test_raw_markup_scanner_catches_what_it_should() -> None:
    bad = ("<article><p>See :func:`cellkit.fit` and</p><p>.. math::</p><pre><code>x</code></pre>"
           "<p>=====  =====</p><p>Example::</p><p>cost $a + b$ here</p><p>a ``{'image': x}`` dict</p>"
           "<blockquote><blockquote><blockquote>x</blockquote></blockquote></blockquote>"
           "<pre><code>" + "y" * 90 + "</code></pre></article>")
    kinds = {f.split(":")[0] for f in raw_markup(bad)}
    assert kinds >= {"RST role", "RST directive", "RST table rule", "RST literal marker", "unrendered math",
                     "RST double backticks",
                     "'>>>' lines rendered as nested quotes (fence them or use an Examples", "code line of 90 characters (> 78)"}
    good = ('<article><p>See <a href="x"><code>fit</code></a>; cost <span class="arithmatex">\\(a+b\\)</span>'
            "; a dict {'a': 1}; C:\\path; time 10:30</p><pre><code>:func:`not a role in code`</code></pre></article>")
    assert raw_markup(good) == []


def test_built_pages_show_no_raw_markup(built_site: Path) -> None:
    problems = {}
    for page in sorted(built_site.rglob("*.html")):
        if page.name == "404.html":
            continue
        found = raw_markup(page.read_text(encoding="utf-8"))
        if found:
            problems[str(page.relative_to(built_site))] = found
    report = "\n".join(f"{page} ({len(f)}):\n  " + "\n  ".join(f[:8]) for page, f in problems.items())
    total = sum(len(f) for f in problems.values())
    assert not problems, f"{total} pieces of raw markup or clipped code in the built site:\n{report}"


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def _mkdocs_config() -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use tags such as !!python/name; they do not matter here.
    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_page_is_in_the_nav_and_exists() -> None:
    nav = _nav_files(_mkdocs_config()["nav"])
    missing = [f for f in nav if not (DOCS / f).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist yet: {missing}"
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [p for p in on_disk if p not in nav] == []


def public_modules() -> list[str]:
    import cellkit

    names = ["cellkit"]
    for info in pkgutil.walk_packages(cellkit.__path__, "cellkit."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def test_every_public_module_has_an_api_page(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: *([\w.]+)", page.read_text(encoding="utf-8"), flags=re.M))
    missing = [m for m in public_modules() if m not in documented]
    assert not missing, f"public modules without an API page (add '::: name' to docs/api/*.md): {missing}"
    unknown = sorted(documented - set(public_modules()))
    assert not unknown, f"docs/api/*.md document modules that do not exist: {unknown}"


# Documented parameters that are not in the signature, reported to the module's owner.
KNOWN_PARAMETER_PROBLEMS: set[str] = set()


def test_documented_parameters_exist() -> None:
    """Each name in an ``Args:`` section is a parameter (``a, b: ...`` documents two).

    mkdocs.yml turns off griffe's own check, which does not understand grouped names.
    """
    if not _has("griffe"):
        pytest.skip("griffe (installed with mkdocstrings[python]) is needed to read the docstrings")
    import griffe

    package = griffe.load("cellkit", search_paths=[str(REPO)], docstring_parser="google", allow_inspection=False)
    problems = []

    def parameters_of(obj) -> set[str] | None:
        if obj.is_function:
            return {p.name for p in obj.parameters}
        if obj.is_class:
            init = obj.all_members.get("__init__")
            if init is not None and init.is_function:
                return {p.name for p in init.parameters}
        return None

    def visit(obj) -> None:
        for member in list(obj.members.values()):
            if member.is_alias or member.name.startswith("__"):
                continue
            if member.is_module or member.is_class or member.is_function:
                if member.docstring is not None and not member.is_module:
                    known = parameters_of(member)
                    if known is not None:
                        sections = member.docstring.parse("google", warn_unknown_params=False, warnings=False)
                        for section in sections:
                            if section.kind.value != "parameters":
                                continue
                            for param in section.value:
                                for name in re.split(r"\s*,\s*", param.name):
                                    name = name.lstrip("*")
                                    where = f"{member.path}: {name}"
                                    if name and name not in known and where not in KNOWN_PARAMETER_PROBLEMS:
                                        problems.append(where)
                visit(member)

    visit(package)
    assert not problems, "docstrings document parameters that do not exist:\n  " + "\n  ".join(problems)


def test_pictures_exist_are_used_and_small() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages())
    used = set(re.findall(r"\]\((?:docs/)?(images/[\w./-]+\.png)\)", text))
    assert {"images/predictions.png", "images/masks.png"} <= used
    for rel in used:
        path = DOCS / rel
        assert path.is_file(), f"{rel} is missing: run python docs/make_figures.py"
        assert path.stat().st_size < MAX_IMAGE_BYTES, f"{rel} is {path.stat().st_size} bytes"
