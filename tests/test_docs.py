"""The documentation stays true to the code.

- every command and subcommand of the Typer app has a page `docs/commands/<path joined by ->.md`, and every page there
  (but the index) names a command that exists;
- every `--option` written on a command page exists on that command (a renamed option breaks this), every option of
  a command appears on its page, and a default written in an option table as one code span equals the real default;
- `modelfix …` lines in code blocks and inline code that starts with a command name (`finetune --method rrr`) are
  checked against the command they name, on the command pages, the method pages and docs/formats.md;
- every registered method has a page `docs/methods/<name>.md` with the sections "Objective", "Paper", "Defaults" and
  "Departures from the reference code", and the Defaults table lists each hyper-parameter and training default with
  the registry's value;
- every relative markdown link in docs/**/*.md and README.md points at an existing file (and, for a `#fragment`, at
  a heading of that file).

No model is built and nothing is run: this reads the click objects Typer builds and the method registry.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import typer

from modelfix.cli import app  # imports every command module, so every command is registered
from modelfix.repair.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COMMAND_PAGES = DOCS / "commands"
METHOD_PAGES = DOCS / "methods"
INDEX = "README.md"
METHOD_SECTIONS = ("Objective", "Paper", "Defaults", "Departures from the reference code")
# Method pages that are not registry entries, and the command that runs each of them.
EXTRA_METHOD_PAGES: dict = {}  # every method page belongs to a registry entry, which names its command
# The commands of the post-hoc registry entries (fine-tunes all run through `finetune`).
POSTHOC_COMMANDS = {"egem": ("prune-egem",), "pca-egem": ("prune-egem",), "egem-full": ("prune-egem",),
                    "rgem": ("refit",), "ridge": ("refit",)}
REGISTRY_INPUTS = ("data", "verdicts")  # filled from --data and --feedback, not hyper-parameters a user sets

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[(?:[^\]\n]|\][^(])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _walk(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, path + (name,))


COMMANDS = dict(_walk(typer.main.get_command(app)))
GLOBAL = COMMANDS[()]


def options(command) -> set[str]:
    """The long options a command line may hold for `command`: its own (both sides of a --flag/--no-flag pair), the
    global ones (`modelfix --debug …`) and `--help`."""
    names = {"--help", "--debug", "--no-progress", "--version"}
    for param in command.params:
        if param.param_type_name == "option":
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return names


OPTIONS = {path: options(command) for path, command in COMMANDS.items()}
ALL_OPTIONS = set().union(*OPTIONS.values())
GLOBAL_OPTIONS = OPTIONS[()]


def page_name(path: tuple[str, ...]) -> str:
    return "-".join(path) + ".md"


def resolve(words: list[str]) -> tuple[tuple[str, ...], int] | None:
    """The longest command path `words` start with (global options before it skipped), and how many words it took;
    None when the words name no command."""
    i, path = 0, ()
    while i < len(words) and words[i] in GLOBAL_OPTIONS:
        i += 1
    while i < len(words) and words[i] in getattr(COMMANDS[path], "commands", {}):
        path += (words[i],)
        i += 1
    return (path, i) if path else None


def modelfix_calls(line: str):
    """(command path, option tokens) for every `modelfix …` call in a shell line (chains split at && ; |)."""
    line = re.sub(r"\s#.*$", "", line)
    for part in re.split(r"&&|;|\|", line):
        words = part.split()
        if "modelfix" not in words:
            continue
        rest = words[words.index("modelfix") + 1:]
        found = resolve(rest)
        path, used = found if found else ((), 0)
        yield path, OPTION.findall(" ".join(rest[used:]))


def code_lines(text: str):
    """Logical lines of the fenced code blocks (backslash continuations joined)."""
    for block in FENCE.findall(text):
        body = "\n".join(block.splitlines()[1:-1])
        yield from body.replace("\\\n", " ").splitlines()


def prose(text: str) -> str:
    return FENCE.sub("", text)


def option_uses(text: str, own: set[str]):
    """(option, the options it must belong to, where) for every option written in `text`: calls in code blocks and
    inline code naming a command are checked against that command, everything else against `own`."""
    for line in code_lines(text):
        for path, found in modelfix_calls(line):
            for option in found:
                yield option, OPTIONS[path], f"`modelfix {' '.join(path)}` in a code block"
    rest = prose(text)
    for span in INLINE.findall(rest):
        words = span.split()
        if words and words[0] == "modelfix":
            for path, found in modelfix_calls(span):
                for option in found:
                    yield option, OPTIONS[path], f"`{span}`"
            continue
        found = resolve(words) if words and not words[0].startswith("-") else None
        if found:
            path, used = found
            for option in OPTION.findall(" ".join(words[used:])):
                yield option, OPTIONS[path], f"`{span}`"
        else:
            for option in OPTION.findall(span):
                yield option, own, f"`{span}`"
    for option in OPTION.findall(INLINE.sub("", rest)):
        yield option, own, "the text"


def sections(text: str) -> dict[str, str]:
    """`## Heading` → the text under it (to the next `## `)."""
    parts = re.split(r"^## +(.+?)\s*$", prose(text), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def table_rows(text: str):
    """The cells of every markdown table row (header and separator rows included)."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|"):
            yield [cell.strip() for cell in re.split(r"(?<!\\)\|", line[1:-1])]


def same_value(cell: str, value) -> bool:
    """A default as written in a table (`0.05`, `decoy-digits:train`, `False`) against the code's value."""
    if isinstance(value, bool):
        return cell == str(value)
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(cell), float(value), rel_tol=1e-12, abs_tol=0.0)
        except ValueError:
            return False
    if isinstance(value, (list, tuple)):
        return cell == ",".join(map(str, value))
    return cell == str(value)


def slugs(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?)\s*#*\s*$", prose(text), flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# ---- command pages ----------------------------------------------------------------------------------------------


def command_pages() -> dict[str, tuple[str, ...]]:
    return {page_name(path): path for path in COMMANDS if path}


@pytest.mark.parametrize("path", [p for p in COMMANDS if p], ids=lambda p: " ".join(p))
def test_every_command_has_a_page(path):
    assert (COMMAND_PAGES / page_name(path)).is_file(), f"no page docs/commands/{page_name(path)} for `modelfix {' '.join(path)}`"


def test_every_command_page_names_a_command():
    known = command_pages()
    stray = sorted(p.name for p in COMMAND_PAGES.glob("*.md") if p.name != INDEX and p.name not in known)
    assert not stray, f"pages for commands that do not exist: {stray}"


def test_the_command_index_links_every_page():
    index = (COMMAND_PAGES / INDEX).read_text(encoding="utf-8")
    missing = [name for name in command_pages() if f"]({name})" not in index]
    assert not missing, f"docs/commands/README.md does not link {missing}"


def _command_page_cases():
    for name, path in sorted(command_pages().items()):
        if (COMMAND_PAGES / name).is_file():
            yield pytest.param(name, path, id=name)


@pytest.mark.parametrize("name, path", list(_command_page_cases()))
def test_command_page_options_exist_and_are_complete(name, path):
    text = (COMMAND_PAGES / name).read_text(encoding="utf-8")
    own = OPTIONS[path]
    wrong = sorted({f"{option} ({where})" for option, allowed, where in option_uses(text, own) if option not in allowed})
    assert not wrong, f"docs/commands/{name} names options that do not exist: {wrong}"
    written = set(OPTION.findall(text))
    missing = sorted(own - GLOBAL_OPTIONS - written)
    assert not missing, f"docs/commands/{name} does not document {missing}"


@pytest.mark.parametrize("name, path", list(_command_page_cases()))
def test_command_page_defaults_match_the_code(name, path):
    text = (COMMAND_PAGES / name).read_text(encoding="utf-8")
    params = {o: p for p in COMMANDS[path].params if p.param_type_name == "option" for o in p.opts}
    checked = 0
    for cells in table_rows(text):
        if len(cells) < 2:
            continue
        names = OPTION.findall(cells[0])
        written = re.fullmatch(r"`([^`]*)`", cells[1])
        if len(names) != 1 or names[0] not in params or not written:
            continue
        default = params[names[0]].default
        assert same_value(written.group(1), default), (
            f"docs/commands/{name}: {names[0]} default written as {written.group(1)!r}, the code has {default!r}")
        checked += 1
    if COMMANDS[path].params and any(p.default not in (None, False) for p in params.values()):
        assert checked, f"docs/commands/{name}: no option table with defaults found"


# ---- method pages -----------------------------------------------------------------------------------------------


def method_command(name: str) -> tuple[str, ...]:
    if name in EXTRA_METHOD_PAGES:
        return EXTRA_METHOD_PAGES[name]
    return (METHODS[name].command,)


def test_every_method_has_a_page_and_every_page_a_method():
    pages = {p.stem for p in METHOD_PAGES.glob("*.md") if p.name != INDEX}
    expected = set(METHODS) | set(EXTRA_METHOD_PAGES)
    assert not expected - pages, f"methods without a page in docs/methods/: {sorted(expected - pages)}"
    assert not pages - expected, f"pages for methods that do not exist: {sorted(pages - expected)}"


def test_the_method_index_links_every_page():
    index = (METHOD_PAGES / INDEX).read_text(encoding="utf-8")
    missing = [n for n in (*METHODS, *EXTRA_METHOD_PAGES) if f"]({n}.md)" not in index]
    assert not missing, f"docs/methods/README.md does not link {missing}"


@pytest.mark.parametrize("name", [*METHODS, *EXTRA_METHOD_PAGES])
def test_method_page_sections_options_and_defaults(name):
    page = METHOD_PAGES / f"{name}.md"
    if not page.is_file():
        pytest.fail(f"no page docs/methods/{name}.md")
    text = page.read_text(encoding="utf-8")
    found = sections(text)
    missing = [s for s in METHOD_SECTIONS if s not in found]
    assert not missing, f"docs/methods/{name}.md lacks the sections {missing}"
    own = OPTIONS[method_command(name)]
    wrong = sorted({f"{option} ({where})" for option, allowed, where in option_uses(text, own) if option not in allowed})
    assert not wrong, f"docs/methods/{name}.md names options that do not exist: {wrong}"
    if name not in METHODS:
        return
    method = METHODS[name]
    rows = {}
    for cells in table_rows(found["Defaults"]):
        key = re.fullmatch(r"`(\w+)`", cells[0]) if cells else None
        if key and len(cells) > 1:
            rows[key.group(1)] = cells[1]
    expected = {k: v for k, v in method.hyperparameters.items() if k not in REGISTRY_INPUTS}
    expected.update(method.train_defaults)
    for key, value in expected.items():
        assert key in rows, f"docs/methods/{name}.md: the Defaults table has no row for `{key}`"
        cell = rows[key]
        if value is None:
            assert cell.lower().startswith("none"), f"docs/methods/{name}.md: `{key}` is None in the registry, page says {cell!r}"
        else:
            written = re.fullmatch(r"`([^`]*)`", cell)
            assert written and same_value(written.group(1), value), (
                f"docs/methods/{name}.md: `{key}` written as {cell!r}, the registry has {value!r}")


# ---- the other pages ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["formats.md", "commands.md", "commands/README.md", "methods/README.md"])
def test_overview_pages_name_real_options(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    wrong = sorted({f"{option} ({where})" for option, allowed, where in option_uses(text, ALL_OPTIONS)
                    if option not in allowed})
    assert not wrong, f"docs/{page} names options that do not exist: {wrong}"


def markdown_files():
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = INLINE.sub("", prose(path.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # an address (https:, mailto:) or an anchor of this page
        file, _, fragment = target.partition("#")
        resolved = (path.parent / file).resolve()
        if not resolved.exists():
            broken.append(target)
        elif fragment and resolved.suffix == ".md" and fragment not in slugs(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: {broken}"
