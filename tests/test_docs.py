"""The docs stay true: their commands parse, their flags and keys exist, their links land.

Users copy commands and code from README.md and docs/*.md verbatim, so every `loratune ...` line in a
shell block must parse (a renamed flag fails here, not on a user's machine), the key table of
docs/training.md must hold real keys with their real defaults, and links between the docs must
point at files and headings that exist.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

from loratune.cli.main import build_parser, either_spelling
from loratune.train.config import key_owners

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
VERB_START = re.compile(r"^\s*(?:\S*/)?loratune\s+(?=[a-z])|\s-m loratune\.cli\.main\s+")


def code_blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang in languages]


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `loratune VERB ...` command of the shell blocks, as (where, argv after `loratune`)."""
    found = []
    for path in DOCS:
        for block in code_blocks(path, ("bash", "")):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("|"):
                    match = VERB_START.search(part)
                    if match and "--help" not in part:
                        argv = shlex.split(part[match.end():], comments=True)
                        found.append((f"{path.name}: {part.strip()}", argv))
    return found


def parse(argv: list[str]):
    parser = build_parser(argv)
    return parser.parse_args(either_spelling(parser, argv))


def option_strings(verb: str) -> set[str]:
    parser = build_parser([verb])
    sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
    return {o for action in sub._actions for o in action.option_strings}


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_verb():
    verbs = {argv[0] for _, argv in COMMANDS}
    assert verbs >= {"train", "data", "generate", "chat", "eval", "merge", "export", "inspect", "serve"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_command_parses(where, argv):
    try:
        args = parse(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: argparse refused it (exit {exc.code})")
    assert getattr(args, "flag_problems", []) == [], where  # train / data preview keys


def test_every_flag_in_the_serve_table_exists():
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text[text.index("## Flags"):text.index("## Endpoints")]
    known = option_strings("serve")
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", table))
    assert flags and flags <= known, sorted(flags - known)


def test_every_option_of_serve_is_in_its_table():
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text[text.index("## Flags"):text.index("## Endpoints")]
    missing = {o for o in option_strings("serve") if o.startswith("--") and o not in table} - {"--help"}
    assert not missing, sorted(missing)


def test_every_flag_named_in_cli_md_exists():
    verbs = ("generate", "chat", "eval", "merge", "export", "inspect")
    known = set().union(*(option_strings(v) for v in verbs))
    known |= {o.replace("_", "-") for o in known}
    text = (ROOT / "docs" / "cli.md").read_text()
    named = set(re.findall(r"`[^`]*?(--[a-z][a-z0-9_-]*)", text))
    keys = {"--" + k for k in key_owners()} | {"--no-" + k for k in key_owners()}  # train's flags
    foreign = {"--max-lora-rank", "--lora"}  # vLLM's and llama.cpp's own flags
    assert not named - known - keys - foreign, sorted(named - known - keys - foreign)


def _default(field: dataclasses.Field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _same(doc: str, value) -> bool:
    doc = doc.strip("`").split(" ")[0]
    if value is None:
        return doc in ("null", "-", "off")
    if isinstance(value, bool):
        return doc == ("true" if value else "false") or (doc == "off" and not value)
    if isinstance(value, (int, float)):
        return float(doc) == float(value)
    return doc == str(value)


def training_key_table() -> list[tuple[str, str, str]]:
    """(row, key, documented default) for each key of the table in docs/training.md."""
    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("| key | default | meaning |"):text.index("\n\n", text.index("| key |"))]
    rows = []
    for line in table.splitlines()[2:]:
        key_cell, default_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        keys = [k for k in re.findall(r"`([a-z0-9_*]+)`", key_cell) if not k.endswith("*")]
        defaults = [d.strip() for d in default_cell.split(",")]
        for i, key in enumerate(keys):
            rows.append((line[:40], key, defaults[i] if len(defaults) == len(keys) else defaults[0]))
    return rows


def test_training_md_keys_are_real_with_their_defaults():
    owners = key_owners()
    rows = training_key_table()
    assert len(rows) > 30
    for row, key, doc in rows:
        assert key in owners, f"docs/training.md names {key!r}, which is not a config key ({row})"
        assert _same(doc, _default(owners[key][1])), (key, doc, _default(owners[key][1]))


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_between_the_docs_land():
    broken = []
    for path in [*DOCS, ROOT / "BENCHMARKS.md", ROOT / "bench" / "README.md"]:
        for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if link.startswith(("http://", "https://")):
                continue
            target, _, anchor = link.partition("#")
            dest = (path.parent / target) if target else path
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
                broken.append(f"{path.name}: {link}")
    assert not broken


def test_readme_library_example_runs(tmp_path, monkeypatch):
    """README's PEFT-style block, with its placeholder model id swapped for a tiny local model."""
    from factories import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "base")
    block = next(b for b in code_blocks(ROOT / "README.md", ("python",)) if "get_peft_model" in b)
    assert block.count('"path/or/hub-id"') >= 2  # the model, then a fresh base to load onto
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("path/or/hub-id", str(tmp_path / "base")), "README.md", "exec"), {})
    assert {p.name for p in (tmp_path / "my-adapter").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "README.md"}


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(dotted)


def test_every_loratune_name_the_docs_cite_exists():
    cited = set()
    for path in DOCS:
        cited |= set(re.findall(r"`(loratune(?:\.[A-Za-z_]\w*)+)", path.read_text()))
    assert len(cited) > 20
    missing = []
    for name in sorted(cited):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing


def test_every_repository_file_the_docs_cite_exists():
    pattern = r"`([\w./-]+/[\w.-]+\.(?:py|yaml|jsonl|md))`"
    cited = {(p.name, f) for p in DOCS for f in re.findall(pattern, p.read_text())}
    assert len(cited) > 10
    missing = [(doc, f) for doc, f in cited
               if not (ROOT / f).exists() and not (ROOT / "src" / "loratune" / f).exists()]
    assert not missing
