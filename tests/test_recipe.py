"""Recipes: strict YAML (its implicit-typing traps, no unsafe loaders), the schema with dotted-path
errors, extends, overrides, and trust_remote_code pinned to a commit."""

from __future__ import annotations

import ast
import re
import string
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptkit.errors import ConfigError
from adaptkit.recipe.schema import Recipe, apply_overrides, deep_merge, load_recipe, read_raw, validate
from adaptkit.recipe.yaml import load_yaml, parse_scalar

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  source: org/tiny-model
data:
  source: data.jsonl
strategies:
  - freeze
train:
  lr: 2e-5
"""


def base_raw(**sections) -> dict:
    raw = {"model": {"source": "org/tiny-model"}, "data": {"source": "data.jsonl"}, "strategies": ["freeze"]}
    raw.update(sections)
    return raw


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(exc: pytest.ExceptionInfo) -> dict[str, str]:
    return {path: msg for path, msg in exc.value.problems}


# -- YAML traps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value", [("2e-5", 2e-5), ("1e-4", 1e-4), ("3E+2", 300.0), ("5.0e-5", 5e-5), (".5", 0.5)]
)
def test_exponent_floats_are_floats(text, value):
    got = load_yaml(f"lr: {text}")["lr"]
    assert type(got) is float and got == value


def test_lr_2e5_is_a_float_after_validation(tmp_path, host):
    recipe = load_recipe(write(tmp_path, "r.yaml", GOOD), host=host)
    assert type(recipe.train.lr) is float
    assert recipe.train.lr == 2e-05


@pytest.mark.parametrize(
    "text, value",
    [
        ("true", True),
        ("false", False),
        ("0", 0),
        ("-3", -3),
        ("1_000", 1000),
        ("0x10", 16),
        ("null", None),
        ("'on'", "on"),
        ('"010"', "010"),
        ("text", "text"),
    ],
)
def test_unambiguous_scalars(text, value):
    got = load_yaml(f"k: {text}")["k"]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "Yes", "ON", "y", "n", "010", "007", "-01"])
def test_ambiguous_scalars_are_refused_naming_the_line(word):
    with pytest.raises(ConfigError) as exc:
        load_yaml(f"model:\n  source: x\ntrain:\n  mixed_precision: {word}\n", source="r.yaml")
    msg = str(exc.value)
    assert "line 4" in msg and repr(word) in msg and msg.startswith("r.yaml: ")


def test_ambiguous_key_is_refused_too():
    with pytest.raises(ConfigError, match="line 2"):
        load_yaml("a: 1\non: 2\n")


def test_duplicate_key_is_refused_naming_its_line():
    with pytest.raises(ConfigError) as exc:
        load_yaml("train:\n  lr: 1e-3\n  epochs: 2\n  lr: 2e-5\n")
    assert "line 4" in str(exc.value) and "duplicate key 'lr'" in str(exc.value)


def test_duplicate_top_level_section_in_a_recipe_file(tmp_path, host):
    path = write(tmp_path, "r.yaml", GOOD + "train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"line 9: duplicate key 'train'"):
        load_recipe(path, host=host)


def test_duplicate_key_through_merge_key_is_not_a_false_positive():
    # ``<<`` merges are flattened first; an explicit key may then override a merged one
    assert load_yaml("base: &b {lr: 1.0}\ntrain:\n  <<: *b\n  epochs: 2\n")["train"] == {
        "lr": 1.0,
        "epochs": 2,
    }


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system",
        "!!python/object/apply:subprocess.call",
        "!!python/object/new:os.system",
    ],
)
def test_python_tags_never_run(tmp_path, host, tag):
    marker = tmp_path / "pwned"
    payload = f"{tag} [['touch', '{marker}']]" if "subprocess" in tag else f"{tag} ['touch {marker}']"
    path = write(tmp_path, "evil.yaml", GOOD + f"name: {payload}\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(path, host=host)
    assert "line 9" in str(exc.value)
    assert not marker.exists()
    with pytest.raises(ConfigError):
        parse_scalar(payload)
    assert not marker.exists()


def test_not_a_mapping_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_raw(write(tmp_path, "list.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_raw(write(tmp_path, "broken.yaml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        read_raw(tmp_path / "absent.yaml")


# -- schema ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, key, path",
    [
        ("model", "sorce", "model.sorce"),
        ("train", "lr_rate", "train.lr_rate"),
        ("data", "txt", "data.txt"),
        (None, "optimiser", "optimiser"),
    ],
)
def test_unknown_keys_are_errors_at_every_level(host, section, key, path):
    raw = base_raw()
    if section is None:
        raw[key] = 1
    else:
        raw.setdefault(section, {})[key] = "x"
    with pytest.raises(ConfigError) as exc:
        validate(raw, host=host)
    assert path in problems_of(exc)
    assert f"{path}: unknown key" in str(exc.value)


def test_unknown_strategy_option_is_an_error(host):
    with pytest.raises(ConfigError) as exc:
        validate(base_raw(strategies=[{"name": "freeze", "trainable_top_blok": 1}]), host=host)
    assert "strategies[0].trainable_top_blok" in problems_of(exc)


def test_every_problem_is_reported_at_once(host):
    raw = {
        "model": {"source": "m", "sorce": "typo"},
        "data": {"source": "d", "txt": "t"},
        "strategies": [{"name": "freeze", "trainable_top_blocks": -1}, "no_such_strategy"],
        "train": {"lr_rate": 1e-3, "lr": -1.0, "epochs": 0, "micro_batch_size": 0, "mixed_precision": "fp8"},
    }
    with pytest.raises(ConfigError) as exc:
        validate(raw, host=host, source="run.yaml")
    found = problems_of(exc)
    expected = {
        "model.sorce",
        "data.txt",
        "train.lr_rate",
        "train.lr",
        "train.epochs",
        "train.micro_batch_size",
        "train.mixed_precision",
        "strategies[0].trainable_top_blocks",
        "strategies[1].name",
    }
    assert set(found) == expected
    assert len(exc.value.problems) == 9
    text = str(exc.value)
    assert text.startswith("run.yaml: 9 problems:")
    assert all(f"  {p}: " in text for p in expected)


@pytest.mark.parametrize(
    "section, key, value, path, words",
    [
        ("train", "lr", -1e-4, "train.lr", "greater than 0"),
        ("train", "lr", 0, "train.lr", "greater than 0"),
        ("train", "lr", "fast", "train.lr", "'fast'"),
        ("train", "epochs", 0, "train.epochs", "greater than 0"),
        ("train", "micro_batch_size", 0, "train.micro_batch_size", "positive integer or 'auto'"),
        ("train", "micro_batch_size", "huge", "train.micro_batch_size", "'huge'"),
        ("train", "mixed_precision", "fp8", "train.mixed_precision", "'fp8'"),
        ("train", "scheduler", "exp", "train.scheduler", "'exp'"),
        ("train", "warmup_ratio", 1.0, "train.warmup_ratio", "less than 1"),
        ("train", "gradient_accumulation", 0, "train.gradient_accumulation", "greater than or equal to 1"),
        ("data", "validation_size", 0, "data.validation_size", "greater than 0"),
        ("data", "max_length", 4, "data.max_length", "greater than or equal to 8"),
        ("model", "dtype", "int8", "model.dtype", "'int8'"),
        ("model", "num_labels", 0, "model.num_labels", "greater than or equal to 1"),
        ("model", "dropout", 1.0, "model.dropout", "less than 1"),
    ],
)
def test_bad_values_name_their_path(host, section, key, value, path, words):
    raw = base_raw()
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as exc:
        validate(raw, host=host)
    found = problems_of(exc)
    assert list(found) == [path]
    assert words in found[path]


def test_union_fields_report_one_problem_without_pydantic_tags(host):
    raw = base_raw(
        strategies=[5, "freeze"],
        train={"micro_batch_size": "huge"},
        data={"source": "d", "transforms": [{"name": "t"}, 3]},
    )
    with pytest.raises(ConfigError) as exc:
        validate(raw, host=host)
    paths = [p for p, _ in exc.value.problems]
    assert sorted(set(paths)) == ["data.transforms[1]", "strategies[0]", "train.micro_batch_size"]
    assert paths.count("train.micro_batch_size") == 1
    assert not any(tag in str(exc.value) for tag in (".int", "literal[", "dict[str", ".str:"))


def test_strategy_items_are_all_checked_even_after_a_malformed_one(host):
    with pytest.raises(ConfigError) as exc:
        validate(
            base_raw(
                strategies=[{"trainable_top_blocks": 1}, "nope", {"name": "freeze", "train_head": "maybe"}]
            ),
            host=host,
        )
    found = problems_of(exc)
    assert set(found) == {"strategies[0]", "strategies[1].name", "strategies[2].train_head"}
    assert "mapping with 'name'" in found["strategies[0]"]


def test_auto_micro_batch_and_false_mixed_precision(host):
    recipe = validate(base_raw(train={"micro_batch_size": "auto", "mixed_precision": False}), host=host)
    assert recipe.train.micro_batch_size == "auto" and recipe.train.mixed_precision == "no"


@pytest.mark.parametrize(
    "strategies, path, words",
    [
        ([], "strategies", "at least 1"),
        ("freeze", "strategies", "list"),
        (["no_such_strategy"], "strategies[0].name", "no_such_strategy"),
        (["freeze", "nope"], "strategies[1].name", "nope"),
        (
            [{"name": "freeze", "trainable_top_blocks": -1}],
            "strategies[0].trainable_top_blocks",
            "greater than or equal to 0",
        ),
        ([{"name": "freeze", "tied_head": "merge"}], "strategies[0].tied_head", "'merge'"),
    ],
)
def test_strategy_problems_name_their_path(host, strategies, path, words):
    with pytest.raises(ConfigError) as exc:
        validate(base_raw(strategies=strategies), host=host)
    messages = [msg for p, msg in exc.value.problems if p == path]
    assert messages and any(words in msg for msg in messages), exc.value.problems


def test_unknown_task_is_reported(host):
    with pytest.raises(ConfigError) as exc:
        validate(base_raw(model={"source": "m", "task": "translation"}), host=host)
    assert "translation" in problems_of(exc)["model.task"]


def test_missing_required_sections(host):
    with pytest.raises(ConfigError) as exc:
        validate({"strategies": ["freeze"]}, host=host)
    assert {"model", "data"} <= set(problems_of(exc))


def test_defaults_of_a_minimal_recipe(host):
    recipe = validate(base_raw(), host=host)
    assert recipe.model.task == "classification"
    assert recipe.model.trust_remote_code is False
    assert recipe.train.mixed_precision == "no" and recipe.train.lr == 5e-5
    assert recipe.strategies == ["freeze"]


# -- trust_remote_code -------------------------------------------------------------------------


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "abc123", "A" * 40, "g" * 40, "a" * 39])
def test_remote_code_needs_a_pinned_commit(host, revision):
    model = {"source": "org/custom-model", "trust_remote_code": True}
    if revision is not None:
        model["revision"] = revision
    with pytest.raises(ConfigError) as exc:
        validate(base_raw(model=model), host=host)
    assert "trust_remote_code" in str(exc.value) and "40-hex" in str(exc.value)


def test_remote_code_with_a_pinned_commit_is_accepted(host):
    sha = "0123456789abcdef0123456789abcdef01234567"
    recipe = validate(
        base_raw(model={"source": "org/custom-model", "trust_remote_code": True, "revision": sha}), host=host
    )
    assert recipe.model.trust_remote_code is True and recipe.model.revision == sha


def test_remote_code_from_a_local_directory_needs_no_revision(tmp_path, host):
    recipe = validate(base_raw(model={"source": str(tmp_path), "trust_remote_code": True}), host=host)
    assert recipe.model.trust_remote_code is True


def test_a_revision_alone_needs_no_pinning(host):
    assert (
        validate(base_raw(model={"source": "org/m", "revision": "main"}), host=host).model.revision == "main"
    )


# -- extends -----------------------------------------------------------------------------------


def test_extends_deep_merges_and_child_wins(tmp_path, host):
    write(
        tmp_path,
        "base/parent.yaml",
        """\
        name: parent-name
        model:
          source: org/parent
          dtype: bfloat16
        data:
          source: parent.jsonl
          max_length: 64
        strategies:
          - name: freeze
            trainable_top_blocks: 1
          - full
        train:
          lr: 1e-3
          epochs: 3
    """,
    )
    child = write(
        tmp_path,
        "runs/child.yaml",
        """\
        extends: ../base/parent.yaml
        model:
          source: org/child
        strategies:
          - freeze
        train:
          lr: 2e-5
    """,
    )
    recipe = load_recipe(child, host=host)
    assert recipe.name == "child"  # the parent's name is not inherited
    assert recipe.model.source == "org/child" and recipe.model.dtype == "bfloat16"
    assert recipe.data.source == "parent.jsonl" and recipe.data.max_length == 64
    assert recipe.train.lr == 2e-5 and recipe.train.epochs == 3
    assert recipe.strategies == ["freeze"]  # lists are replaced, not merged


def test_extends_chain_resolves_paths_relative_to_each_file(tmp_path, host):
    write(
        tmp_path,
        "a/grand.yaml",
        "model: {source: org/g}\ndata: {source: g.jsonl}\nstrategies: [full]\ntrain: {seed: 7}\n",
    )
    write(tmp_path, "a/b/parent.yaml", "extends: ../grand.yaml\ntrain: {lr: 1e-3}\n")
    child = write(tmp_path, "c/child.yaml", "extends: ../a/b/parent.yaml\ntrain: {epochs: 2}\n")
    recipe = load_recipe(child, host=host)
    assert (recipe.train.seed, recipe.train.lr, recipe.train.epochs) == (7, 1e-3, 2)
    assert recipe.model.source == "org/g"


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nmodel: {source: a}\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        read_raw(tmp_path / "a.yaml")
    write(tmp_path, "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        read_raw(tmp_path / "self.yaml")


def test_extends_missing_parent(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_raw(write(tmp_path, "r.yaml", "extends: nowhere.yaml\n"))


def test_deep_merge_does_not_change_its_inputs():
    base, over = {"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": 3}, "l": [2]}
    assert deep_merge(base, over) == {"a": {"b": 3, "c": 2}, "l": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "l": [1]} and over == {"a": {"b": 3}, "l": [2]}


# -- overrides ---------------------------------------------------------------------------------


def test_override_lr_is_a_float(tmp_path, host):
    recipe = load_recipe(
        write(tmp_path, "r.yaml", GOOD),
        ["train.lr=1e-4", "train.epochs=2", "model.dtype=bfloat16"],
        host=host,
    )
    assert type(recipe.train.lr) is float and recipe.train.lr == 1e-4
    assert recipe.train.epochs == 2 and recipe.model.dtype == "bfloat16"


@pytest.mark.parametrize("key", ["strategies.0.trainable_top_blocks", "strategies[0].trainable_top_blocks"])
def test_override_list_items_both_forms(host, key):
    raw = apply_overrides(base_raw(strategies=["freeze", {"name": "full"}]), [f"{key}=2"])
    assert raw["strategies"] == [{"name": "freeze", "trainable_top_blocks": 2}, {"name": "full"}]
    raw["strategies"] = raw["strategies"][:1]  # freeze and full cannot be combined
    assert validate(raw, host=host).strategies == [{"name": "freeze", "trainable_top_blocks": 2}]


def test_override_into_a_dict_item_and_whole_item(host):
    raw = apply_overrides(
        base_raw(strategies=[{"name": "freeze", "trainable_top_blocks": 1}, "full"]),
        ["strategies[0].train_norms=true", "strategies.1=freeze"],
    )
    assert raw["strategies"] == [{"name": "freeze", "trainable_top_blocks": 1, "train_norms": True}, "freeze"]


def test_override_creates_missing_sections_and_values_keep_equals_signs():
    raw = apply_overrides({}, ["train.seed=3", "name=a=b", "data.options.query=x"])
    assert raw == {"train": {"seed": 3}, "name": "a=b", "data": {"options": {"query": "x"}}}


def test_overrides_do_not_change_the_callers_mapping():
    raw = base_raw(strategies=[{"name": "freeze", "trainable_top_blocks": 1}], train={"lr": 1.0})
    snapshot = repr(raw)
    apply_overrides(raw, ["strategies.0.trainable_top_blocks=2", "train.lr=2.0", "data.source=other"])
    assert repr(raw) == snapshot


def test_bad_override_value_is_reported_by_validation(tmp_path, host):
    with pytest.raises(ConfigError) as exc:
        load_recipe(
            write(tmp_path, "r.yaml", GOOD),
            ["strategies.0.trainable_top_blocks=-1", "train.lr_rate=1"],
            host=host,
        )
    assert set(problems_of(exc)) == {"strategies[0].trainable_top_blocks", "train.lr_rate"}


@pytest.mark.parametrize(
    "item, words",
    [
        ("train.lr", "key.sub=value"),
        ("train.lr 1e-4", "key.sub=value"),
        ("strategies.3.r=1", "out of range"),
        ("strategies[1].r=1", "out of range"),
        ("strategies.-1.r=1", "out of range"),
        ("strategies.first.r=1", "out of range"),
        ("train.lr.value=1", "not a section"),
        ("train.epochs=on", "ambiguous"),
        ("train.epochs=010", "ambiguous"),
        ("train.lr=[1", "not valid YAML"),
        ("train.lr=!!python/object/apply:os.getpid []", "not valid YAML"),
    ],
)
def test_bad_overrides(item, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        apply_overrides(base_raw(train={"lr": 1.0}), [item])


# property: overrides are typed like YAML values and only ever fail with ConfigError

_ident = st.text(string.ascii_lowercase + "_", min_size=1, max_size=6)
_path = st.lists(_ident, min_size=1, max_size=3).map(tuple)
_value = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(lambda v: (str(v), v)),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: (repr(v), v)),
    st.text(string.ascii_letters + string.digits + "_-/", max_size=8).map(lambda s: ("x" + s, "x" + s)),
    st.booleans().map(lambda b: (str(b).lower(), b)),
)


def _no_prefix_clash(paths) -> bool:
    return not any(a != b and b[: len(a)] == a for a in paths for b in paths)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_path, _value, min_size=1, max_size=6).filter(lambda d: _no_prefix_clash(list(d))))
def test_overrides_round_trip_typed_values(assignments):
    items = [".".join(path) + "=" + text for path, (text, _) in assignments.items()]
    base = {"strategies": [{"name": "freeze"}], "train": {"lr": 1.0}}
    raw = apply_overrides(base, items)
    for path, (_, expected) in assignments.items():
        node = raw
        for part in path:
            node = node[part]
        assert node == expected and type(node) is type(expected), (path, node, expected)
    assert base == {"strategies": [{"name": "freeze"}], "train": {"lr": 1.0}}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(max_size=20), max_size=4),
    st.sampled_from(
        [{}, {"strategies": ["freeze", {"name": "full"}]}, {"train": {"lr": 1.0}, "model": None}]
    ),
)
def test_arbitrary_overrides_only_raise_config_errors(items, base):
    try:
        out = apply_overrides(base, items)
    except ConfigError:
        return
    assert isinstance(out, dict)


# -- source scan: no unsafe YAML or torch loads ------------------------------------------------

UNSAFE_YAML = re.compile(
    r"\byaml\.(?:load|load_all|full_load|full_load_all|unsafe_load|unsafe_load_all)\(|\bunsafe_load\b|FullLoader|UnsafeLoader"
)


def _sources() -> list[Path]:
    files = [p for d in ("adaptkit", "plugins") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 10, files
    return files


def _unsafe_torch_loads(source: str) -> list[int]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            is_torch_load = (
                isinstance(f, ast.Attribute)
                and f.attr == "load"
                and isinstance(f.value, ast.Name)
                and f.value.id == "torch"
            )
            if is_torch_load and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            ):
                bad.append(node.lineno)
    return bad


def test_the_scanners_can_find_what_they_look_for():
    assert UNSAFE_YAML.search("cfg = yaml.load(text, Loader=yaml.FullLoader)")
    assert UNSAFE_YAML.search("yaml.unsafe_load(text)")
    assert not UNSAFE_YAML.search("yaml.safe_load(text); StrictLoader(text)")
    assert _unsafe_torch_loads(
        "import torch\nsd = torch.load(p)\nok = torch.load(p, weights_only=True)\n"
    ) == [2]
    assert _unsafe_torch_loads("torch.load(p, weights_only=False)") == [1]


def test_no_unsafe_yaml_or_torch_load_in_the_sources():
    yaml_hits, torch_hits = [], []
    for path in _sources():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        yaml_hits += [f"{rel}:{text[: m.start()].count(chr(10)) + 1}" for m in UNSAFE_YAML.finditer(text)]
        torch_hits += [f"{rel}:{line}" for line in _unsafe_torch_loads(text)]
        if "torch.load(" in text:  # also catch calls the AST check does not recognise (aliases)
            assert "weights_only=True" in text, rel
    assert not yaml_hits, yaml_hits
    assert not torch_hits, torch_hits


# -- the shipped recipes -----------------------------------------------------------------------


def _shipped_recipes() -> list:
    folder = ROOT / "recipes"
    found = (
        sorted(p for pattern in ("*.yaml", "*.yml") for p in folder.rglob(pattern)) if folder.is_dir() else []
    )
    if not found:
        return [pytest.param(None, id="no-recipes")]
    return [pytest.param(p, id=str(p.relative_to(folder))) for p in found]


@pytest.mark.parametrize("path", _shipped_recipes())
def test_shipped_recipe_validates(path, host):
    if path is None:
        pytest.skip("recipes/ holds no *.yaml recipe yet")
    from adaptkit.compare import is_comparison, plan
    from adaptkit.recipe.schema import read_raw

    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: ") and "adaptkit" in first, (
        f"{path} must start with a comment saying how to run it"
    )
    if is_comparison(read_raw(path)):
        p = plan(path, host=host)  # every run of the comparison validates
        assert p.variants and all(jobs for jobs in p.variants.values())
        return
    recipe = load_recipe(path, host=host)
    assert isinstance(recipe, Recipe)
    assert recipe.name
