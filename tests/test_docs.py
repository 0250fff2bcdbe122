"""The stage pages of docs/ say what the configs hold.

Each ``docs/<stage>.md`` has a "Config keys" table (``| key | paper scale | small.json | meaning |``). For every row
whose key is a plain stage setting (a key of ``bundles/<stage>.json`` or of ``hparams#<stage>`` in
``bundles/common.json`` whose value is a literal, directly or through ``@`` references), the ``paper scale`` column
must equal what ``common.json`` + ``<stage>.json`` give and the ``small.json`` column what ``small.json`` merged after
them gives (blank: small.json leaves it as it is). A changed default fails naming the page, the key, both values and
the file the value comes from. Pure text and JSON: no torch, no MONAI.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
DOCS = REPO / "docs"
NOT_STAGES = {"common.json", "small.json", "multi_gpu.json", "metadata.json"}
STAGES = sorted(p.stem for p in BUNDLES.glob("*.json") if p.name not in NOT_STAGES)
PAGE_OF = {"generate_stylegan2": "train_stylegan2"}  # stages documented on another stage's page
PAPER_COLUMNS = ("paper scale", "paper default", "default")
SMALL_COLUMN = "small.json"
NAME = r"`[A-Za-z_][A-Za-z0-9_]*`"
KEY_CELL = re.compile(rf"^({NAME})((?:\s*(?:,|/|x)\s*{NAME})*)(?:\s*\((\w+)\))?$")
NOT_LITERAL = object()


def _json(name: str) -> dict:
    return json.loads((BUNDLES / name).read_text(encoding="utf-8"))


def _files(stage: str, small: bool) -> list[tuple[str, dict]]:
    """The files a stage runs with, in merge order (later files replace earlier top-level keys)."""
    files = [("bundles/common.json", _json("common.json")), (f"bundles/{stage}.json", _json(f"{stage}.json"))]
    return files + [("bundles/small.json", _json("small.json"))] if small else files


def _lookup(files: list[tuple[str, dict]], ref: str) -> tuple[object, str]:
    """``ref`` (``a#b#c``) in the merged files: the last file holding the top-level key wins, as MONAI merges."""
    first, *rest = ref.split("#")
    for name, content in reversed(files):
        if first in content:
            node = content[first]
            for part in rest:
                node = node[int(part)] if isinstance(node, list) else node[part]
            return node, f"{name} {ref}"
    raise KeyError(ref)


def setting(stage: str, ref: str, small: bool) -> tuple[object, str]:
    """The literal value of ``ref`` for ``stage`` (``@`` references followed) and where it comes from;
    ``NOT_LITERAL`` for an expression, a list or a section."""
    files, sources = _files(stage, small), []
    for _ in range(10):
        value, source = _lookup(files, ref)
        sources.append(source)
        if isinstance(value, str) and re.fullmatch(r"@[\w#]+", value):
            ref = value[1:]
            continue
        break
    literal = value is None or isinstance(value, (bool, int, float)) or (
        isinstance(value, str) and not value.startswith(("$", "@", "%")))
    return (value if literal else NOT_LITERAL), " -> ".join(sources)


def stage_settings(stage: str) -> dict[str, str]:
    """The plain settings of a stage: key -> reference (its own keys, then its ``hparams`` entries)."""
    own = {k: k for k in _json(f"{stage}.json") if not k.startswith("_")}
    hparams = _json("common.json")["hparams"].get(stage, {})
    return {**{k: f"hparams#{stage}#{k}" for k in hparams}, **own}


def config_tables(page: str) -> list[dict]:
    """The rows of the "Config keys" tables of ``docs/<page>.md``: stage, line number, columns by header name."""
    stage, rows, header, in_section = page, [], None, False
    lines = (DOCS / f"{page}.md").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        heading = re.match(r"^#+\s+(.*)$", line)
        if heading:
            title = heading.group(1)
            in_section = title.startswith("Config keys")
            named = re.search(r"\((\w+)\)\s*$", title)
            stage = named.group(1) if in_section and named else page
            header = None
            continue
        if not (in_section and line.startswith("|")):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append({"stage": stage, "line": number, **dict(zip(header, cells))})
    return rows


def _token(text: str) -> str:
    """A value as the page writes it, less a trailing remark in parentheses and the backticks."""
    return re.sub(r"\s*\([^()]*\)$", "", text.strip()).strip().strip("`")


def _same(text: str, value: object) -> bool:
    if value is None:
        return text == "null"
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(text), float(value), rel_tol=1e-9, abs_tol=0.0)
        except ValueError:
            return False
    return text == value


def _split(cell: str, keys: list[str], sep: str) -> list[str] | None:
    """One value per key, separated as the keys are; None when the cell does not read that way."""
    if len(keys) == 1:
        return [cell]
    parts = [p.strip() for p in re.split({",": r",\s+", "/": r"\s+/\s+", "x": r"\s+x\s+"}[sep], cell)]
    return parts if len(parts) == len(keys) else None


def checked_rows(page: str) -> list[tuple[str, list[str], list[tuple[str, str]], dict]]:
    """(stage, keys, [(key, reference)] of the plain settings among them, row) for each row of a page's tables
    that names at least one plain setting."""
    out = []
    for row in config_tables(page):
        match = KEY_CELL.match(row.get("key", ""))
        if not match:
            continue
        keys = re.findall(r"`([^`]+)`", match.group(1) + match.group(2))
        stage = match.group(3) if match.group(3) in STAGES else row["stage"]
        plain = stage_settings(stage)
        refs = [(k, plain[k]) for k in keys if k in plain and setting(stage, plain[k], False)[0] is not NOT_LITERAL]
        if refs:
            out.append((stage, keys, refs, row))
    return out


def _pages() -> list[str]:
    return sorted({PAGE_OF.get(s, s) for s in STAGES})


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_config_keys_table_with_its_training_settings(stage):
    page = PAGE_OF.get(stage, stage)
    assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing (stage {stage})"
    rows = [r for r in config_tables(page) if r["stage"] == stage]
    assert rows, f"docs/{page}.md has no 'Config keys' table for {stage}"
    assert any(c in rows[0] for c in PAPER_COLUMNS), f"docs/{page}.md: no paper-scale column in {sorted(rows[0])}"
    documented = {k for s, keys, _, _ in checked_rows(page) if s == stage for k in keys}
    hparams = set(_json("common.json")["hparams"].get(stage, {})) | set(_json("small.json")["hparams"].get(stage, {}))
    missing = sorted(hparams - documented)
    assert not missing, f"docs/{page}.md: the Config keys table of {stage} lacks its hparams {missing}"
    if hparams:
        assert SMALL_COLUMN in rows[0], f"docs/{page}.md: {stage} has small.json hparams but no small.json column"


@pytest.mark.parametrize("page", _pages())
def test_config_keys_tables_match_the_configs(page):
    errors, checked = [], 0
    for stage, keys, refs, row in checked_rows(page):
        where = f"docs/{page}.md:{row['line']}"
        sep = re.search(r"`\s*(,|/|x)\s*`", row["key"])
        sep = sep.group(1) if sep else ","
        paper_column = next(c for c in PAPER_COLUMNS if c in row)
        paper = _split(row[paper_column], keys, sep)
        if paper is None:
            errors.append(f"{where}: cannot read one '{paper_column}' value per key of {row['key']}: "
                          f"{row[paper_column]!r}")
            continue
        small_cell = row.get(SMALL_COLUMN)
        pairs = dict(re.findall(r"`([A-Za-z_]\w*)`\s+([^,]+)", small_cell or ""))
        small = None if not small_cell or pairs else _split(small_cell, keys, sep)
        if small_cell and not pairs and small is None:
            errors.append(f"{where}: cannot read one small.json value per key of {row['key']}: {small_cell!r}")
            continue
        for key, ref in refs:
            i = keys.index(key)
            value, source = setting(stage, ref, False)
            checked += 1
            if not _same(_token(paper[i]), value):
                errors.append(f"{where}: `{key}` ({stage}) paper scale: the page says {_token(paper[i])!r}, "
                              f"{source} gives {json.dumps(value)}")
            small_value, small_source = setting(stage, ref, True)
            if small_value is NOT_LITERAL:
                continue
            if small_cell is None or (not small_cell) or (pairs and key not in pairs):
                if not _same(_token(paper[i]), small_value) and small_value != value:
                    column = "is blank" if small_cell is not None else "is missing"
                    errors.append(f"{where}: `{key}` ({stage}) small.json: the column {column} (i.e. "
                                  f"{_token(paper[i])!r}), {small_source} gives {json.dumps(small_value)}")
                continue
            text = _token(pairs[key] if pairs else small[i])
            if not _same(text, small_value):
                errors.append(f"{where}: `{key}` ({stage}) small.json: the page says {text!r}, {small_source} "
                              f"gives {json.dumps(small_value)}")
    assert checked, f"docs/{page}.md: no plain stage setting found in its Config keys tables"
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name,path,value,page,message", [
    ("small.json", ["hparams", "finetune", "lr"], 0.5, "finetune",
     r"docs/finetune\.md:\d+: `lr` \(finetune\) small\.json: the page says '1e-4', bundles/finetune\.json lr -> "
     r"bundles/small\.json hparams#finetune#lr gives 0\.5"),
    ("common.json", ["hparams", "pretrain_autoencoder", "lr"], 1e-5, "pretrain_autoencoder",
     r"docs/pretrain_autoencoder\.md:\d+: `lr` \(pretrain_autoencoder\) paper scale: the page says '4\.5e-6', "
     r"bundles/pretrain_autoencoder\.json lr -> bundles/common\.json hparams#pretrain_autoencoder#lr gives 1e-05"),
    ("generate.json", ["guidance_interval"], 1, "generate",
     r"docs/generate\.md:\d+: `guidance_interval` \(generate\) paper scale: the page says '4', "
     r"bundles/generate\.json guidance_interval gives 1"),
])
def test_a_changed_default_fails_naming_the_page_the_key_and_both_values(monkeypatch, name, path, value, page,
                                                                         message):
    real = _json

    def changed(file: str) -> dict:
        content = real(file)
        if file == name:
            node = content
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return content

    monkeypatch.setitem(globals(), "_json", changed)
    with pytest.raises(AssertionError, match=message):
        test_config_keys_tables_match_the_configs(page)
