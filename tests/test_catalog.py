"""The registry knows itself: `python -m pipeline.techniques`, the README's tables against the
registry, each conf/technique YAML against its Options defaults, and the papers cited."""
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from pipeline.config import CONF_DIR
from pipeline.contracts import Family, Kind
from pipeline.techniques import REGISTRY, catalog, describe, get_technique
from pipeline.techniques.__main__ import main
from pipeline.techniques.catalog import markdown, option_defaults, text, yaml_value

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BEGIN, END = "<!-- techniques:begin", "<!-- techniques:end -->"


# -- the listing ------------------------------------------------------------------------------------
def test_catalog_lists_every_technique_once_grouped_by_family():
    entries = catalog()
    assert sorted(e.name for e in entries) == sorted(REGISTRY)
    order = list(Family)
    assert [order.index(e.family) for e in entries] == sorted(order.index(e.family) for e in entries)
    for e in entries:
        cls = get_technique(e.name)
        assert (e.family, e.paper, dict(e.outputs), e.uses_data, e.video) == (cls.family, cls.paper, cls.outputs,
                                                                            cls.uses_data, cls.video)
        assert set(e.needs) == set(cls.needs) and dict(e.options) == asdict(cls.Options())


def test_text_shows_family_outputs_shapes_needs_paper_and_option_defaults():
    out = text([describe("gradcam"), describe("erf"), describe("class_vis")])
    block = out.split("\n\n")[0]
    assert block.splitlines()[0] == "gradcam  (cam)"
    for line in ["paper    Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391", "cam  heatmap [N, K, (T,) h, w]",
                 "needs    acts, layer_grads", "relu: true", "per input batch, on the chosen layers"]:
        assert line in block, line
    assert "rf_box  data [4] int64" in out and "summary (per layer, at the end of a run)" in out  # erf's summary
    assert 'classes: "0"' in out and "scales: [1.0, 0.975, 1.025, 0.95, 1.05]" in out
    assert "once per run, no input data" in out


def test_yaml_value_writes_defaults_as_yaml_reads_them():
    for value in [None, True, False, 0.05, 8, "0-7", "0", "riemann", [1.0, 0.975], [], "null"]:
        assert yaml.safe_load(yaml_value(value)) == value, value


def test_the_module_cli_lists_all_some_markdown_and_refuses_unknown_names(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{name}  \(", out, re.M) for name in REGISTRY)
    assert main(["saliency", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown([describe("saliency")])
    assert main(["gradcamm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown technique 'gradcamm'") and "gradcam" in err
    run = subprocess.run([sys.executable, "-m", "pipeline.techniques", "occlusion"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0 and run.stdout == text([describe("occlusion")]), run.stderr


# -- README ----------------------------------------------------------------------------------------
def test_readme_reference_table_is_the_generated_one():
    assert README.count(BEGIN) == 1 and README.count(END) == 1
    block = README[README.index(BEGIN):README.index(END)]
    generated = block[block.index("-->\n") + 4:]
    assert generated == markdown(catalog()), "run python -m pipeline.techniques --markdown and paste it into README.md"


def hand_tables():
    """{header: [row cells]} of the README's technique tables outside the generated block."""
    text = README[:README.index(BEGIN)] + README[README.index(END):]
    tables, header = {}, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if header is None:
            header = tuple(cells)
        elif not set(line) <= set("|-: ") and cells[0].startswith("`") and header[0] == "name":
            tables.setdefault(header, []).append(cells)
    return tables


def test_readme_tables_name_every_technique_once():
    names = [cells[0].strip("`") for rows in hand_tables().values() for cells in rows]
    assert sorted(names) == sorted(REGISTRY)


def test_readme_tables_cite_the_registry_papers_and_kinds():
    checked = 0
    for header, rows in hand_tables().items():
        for cells in rows:
            row, cls = dict(zip(header, cells)), get_technique(cells[0].strip("`"))
            if "paper" in row:
                assert row["paper"] == (cls.paper.cite if cls.paper else "—"), cls.name
            for column, cell in row.items():
                if column.startswith("stored"):
                    checked += check_kinds(cls, cell)
    assert checked >= 10  # the parser found the kinds (14 today)


def check_kinds(cls, cell: str) -> int:
    """Each `output` followed (before the next backticked name) by "(<kind>)" has that kind."""
    tokens = list(re.finditer(r"`([^`]+)`", cell))
    kinds = "|".join(k.value for k in Kind)
    checked = 0
    for i, token in enumerate(tokens):
        rest = cell[token.end():tokens[i + 1].start() if i + 1 < len(tokens) else len(cell)]
        said = re.search(rf"\(({kinds})\)", rest)
        if said:
            output = token.group(1).split("/")[-1]
            assert cls.outputs[output].kind is Kind(said.group(1)), (cls.name, output)
            checked += 1
    return checked


def test_readme_option_defaults_are_the_options_dataclass_defaults():
    checked = 0
    for header, rows in hand_tables().items():
        for cells in rows:
            cls = get_technique(cells[0].strip("`"))
            defaults = option_defaults(cls.Options)
            for column, cell in zip(header, cells):
                if not column.startswith("options"):
                    continue
                for key, value in re.findall(r"`(\w+): ([^`]+)`", cell):
                    assert key in defaults, (cls.name, key)
                    said = yaml.safe_load(value.split("\\|")[0].strip())  # "black \| blur": the default first
                    assert said == defaults[key] and type(said) in (type(defaults[key]), int), (cls.name, key, said)
                    checked += 1
    assert checked >= 40  # the parser found the defaults (59 today)


# -- conf/technique/*.yaml equal the Options defaults -------------------------------------------------
def same(a, b) -> bool:
    """Equal, of the same type (lists elementwise): 8 is not 8.0, "0" is not 0."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_technique_has_a_yaml_and_every_yaml_a_technique():
    assert sorted(p.stem for p in (CONF_DIR / "technique").glob("*.yaml")) == sorted(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_technique_yaml_equals_its_options_defaults(name):
    conf = yaml.safe_load((CONF_DIR / "technique" / f"{name}.yaml").read_text())
    assert conf["defaults"] == [f"/schema/technique/{name}@{name}"] and set(conf) == {"defaults", name}
    written, defaults = conf[name] or {}, option_defaults(get_technique(name).Options)
    assert list(written) == list(defaults), f"{name}.yaml: keys {list(written)} != Options {list(defaults)}"
    wrong = {key: (written[key], defaults[key]) for key in defaults if not same(written[key], defaults[key])}
    assert not wrong, f"{name}.yaml differs from {name}'s Options (yaml, dataclass): {wrong}"


# -- papers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_paper_is_the_one_the_module_docstring_cites(name):
    cls = get_technique(name)
    doc = sys.modules[cls.__module__].__doc__
    urls = re.findall(r"https?://[^\s,)]+", doc)
    assert (cls.paper is not None) == bool(urls), (name, urls)
    if cls.paper:
        assert cls.paper.url in urls and cls.paper.cite.split(" et al.")[0].split(" & ")[0] in doc
