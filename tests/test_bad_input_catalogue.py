"""A catalogue of malformed recipes, data files and command lines (issue 7).

Every entry goes through the real CLI (``adaptkit.cli.main`` in this process, a few as child
processes) against a finished run in the same output directory, with ``train --fresh`` where it
trains: exit status 2, ONE error line naming the field or file and what is allowed, no traceback,
and every file of the finished run byte for byte unchanged. Hypothesis properties of recipe
parsing and overrides follow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptkit.cli import main
from adaptkit.errors import ConfigError
from adaptkit.recipe.schema import DataSpec, ModelSpec, Recipe, TrainSpec, apply_overrides, validate
from adaptkit.recipe.yaml import dump_yaml, load_yaml
from adaptkit.testing import plugin_host, save_tiny_pretrained

ERROR_LINE = re.compile(r"^adaptkit(?: [a-z]+)?: error: ")
DELETE = object()


def rows(labels: list[str], n: int = 40) -> str:
    words = {"pos": "good great fine", "neg": "bad awful dull", "meh": "so so", "neutral": "plain"}
    return "".join(
        json.dumps({"text": f"the movie was {words[lab]}", "label": lab}) + "\n"
        for i in range(n)
        for lab in [labels[i % len(labels)]]
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("catalogue")
    save_tiny_pretrained(d / "bert", "bert")
    files = {
        "train.jsonl": rows(["neg", "pos"]),
        "empty.jsonl": "",
        "notes.txt": "the movie was good\n",
        "broken.jsonl": rows(["neg", "pos"], 2) + '{"text": "cut off", "label": \n' + rows(["pos"], 1),
        "no_label.jsonl": "".join(json.dumps({"text": "a film", "stars": 3}) + "\n" for _ in range(10)),
        "one_row.jsonl": rows(["pos"], 1),
        "three_labels.jsonl": rows(["neg", "pos", "neutral"], 30),
        "header_only.csv": "text,label\n",
        "split/train.jsonl": rows(["neg", "pos"]),
        "split/validation.jsonl": rows(["neg", "meh"], 6),
        "no_train/validation.jsonl": rows(["neg", "pos"], 6),
        "parent_cycle_a.yaml": "extends: parent_cycle_b.yaml\n",
        "parent_cycle_b.yaml": "extends: parent_cycle_a.yaml\n",
    }
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def base(work: Path) -> dict:
    """A good recipe whose run directory is the finished run ``kept``."""
    return {
        "name": "kept",
        "model": {"source": str(work / "bert"), "task": "classification"},
        "data": {"source": str(work / "train.jsonl"), "max_length": 16},
        "strategies": [{"name": "freeze", "trainable_top_blocks": 1}],
        "train": {"max_steps": 2, "micro_batch_size": 8, "save_every": 1, "lr": 1.0e-3},
        "output": str(work / "runs" / "{name}"),
    }


@pytest.fixture(scope="module")
def kept(work) -> Path:
    """The finished run every failing call must leave alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
        path = work / "kept.yaml"
        path.write_text(dump_yaml(base(work)))
        assert main(["train", str(path), "--fresh"]) == 0
    run_dir = work / "runs" / "kept"
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "step-00000002").is_dir()
    return run_dir


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def edit(recipe: dict, changes: dict) -> dict:
    """Apply ``{"train.lr": value}`` changes to a copy (DELETE removes the key)."""
    out = copy.deepcopy(recipe)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def case(
    id: str,
    words: tuple[str, ...],
    change: dict | None = None,
    text: str | None = None,
    args: tuple[str, ...] = (),
    command: tuple[str, ...] | None = None,
):
    """One catalogue entry: a recipe (``change`` to the good one, or raw ``text``), extra arguments
    (``{W}`` is the work directory), or a whole ``command``; ``words`` must all be in the message."""
    return pytest.param(change, text, args, command, words, id=id)


# {W}: the work directory, {R}: the recipe file, {RUN}: the finished run
CATALOGUE = [
    # -- recipe: unknown keys, wrong types, absurd values ------------------------------------------
    case("unknown-top-level-key", ("optimiser", "unknown key"), {"optimiser": "adam"}),
    case("unknown-train-key", ("train.lr_rate", "unknown key"), {"train.lr_rate": 1e-3}),
    case(
        "misspelt-model-source",
        ("2 problems", "model.source: Field required", "model.sorce: unknown key", "source, task"),
        {"model.source": DELETE, "model.sorce": "x"},
    ),
    case("missing-data-section", ("data", "Field required"), {"data": DELETE}),
    case("lr-is-text", ("train.lr", "valid number", "'fast'"), {"train.lr": "fast"}),
    case("negative-lr", ("train.lr", "greater than 0", "-0.001"), {"train.lr": -1e-3}),
    case("huge-lr", ("train.lr", "less than or equal to 10"), {"train.lr": 100.0}),
    case("zero-epochs", ("train.epochs", "greater than 0"), {"train.epochs": 0}),
    case("negative-max-steps", ("train.max_steps", "greater than or equal to 1"), {"train.max_steps": -5}),
    case(
        "zero-micro-batch",
        ("train.micro_batch_size", "positive integer or 'auto'"),
        {"train.micro_batch_size": 0},
    ),
    case("micro-batch-is-a-list", ("train.micro_batch_size", "'auto'"), {"train.micro_batch_size": [8]}),
    case(
        "zero-accumulation",
        ("train.gradient_accumulation", "greater than or equal to 1"),
        {"train.gradient_accumulation": 0},
    ),
    case("warmup-over-one", ("train.warmup_ratio", "less than 1"), {"train.warmup_ratio": 1.5}),
    case(
        "negative-weight-decay",
        ("train.weight_decay", "greater than or equal to 0"),
        {"train.weight_decay": -0.1},
    ),
    case(
        "zero-keep-checkpoints",
        ("train.keep_checkpoints", "greater than or equal to 1"),
        {"train.keep_checkpoints": 0},
    ),
    case(
        "fp8-mixed-precision",
        ("train.mixed_precision", "'no', 'fp16' or 'bf16'"),
        {"train.mixed_precision": "fp8"},
    ),
    case(
        "fp16-on-the-cpu",
        ("train.mixed_precision", "fp16 needs a GPU", "bf16 or no"),
        {"train.mixed_precision": "fp16"},
    ),
    case("unknown-optimizer", ("train.optimizer", "'adamw'", "'sgd'"), {"train.optimizer": "adam"}),
    case("unknown-tracker", ("train.report_to", "'tensorboard'"), {"train.report_to": ["wandb"]}),
    case("train-not-a-mapping", ("train", "valid dictionary"), {"train": "fast"}),
    case("dropout-of-one", ("model.dropout", "less than 1"), {"model.dropout": 1.0}),
    case("int8-dtype", ("model.dtype", "'float32', 'bfloat16' or 'float16'"), {"model.dtype": "int8"}),
    case("num-labels-is-text", ("model.num_labels", "valid integer", "'two'"), {"model.num_labels": "two"}),
    case("max-length-4", ("data.max_length", "greater than or equal to 8"), {"data.max_length": 4}),
    case("validation-size-zero", ("data.validation_size", "greater than 0"), {"data.validation_size": 0}),
    case("labels-not-a-list", ("data.labels", "valid list"), {"data.labels": "neg,pos"}),
    case(
        "remote-code-unpinned",
        ("model", "trust_remote_code", "40-hex"),
        {"model.source": "org/custom-model", "model.trust_remote_code": True},
    ),
    case("unknown-task", ("model.task", "translation", "classification"), {"model.task": "translation"}),
    # -- recipe: strategies -------------------------------------------------------------------------
    case("strategies-is-a-string", ("strategies", "valid list"), {"strategies": "freeze"}),
    case("no-strategies", ("strategies", "at least 1 item"), {"strategies": []}),
    case("unknown-strategy", ("strategies[0].name", "frieze", "freeze", "lora"), {"strategies": ["frieze"]}),
    case(
        "unknown-strategy-option",
        ("strategies[0].trainable_top_blok", "unknown"),
        {"strategies": [{"name": "freeze", "trainable_top_blok": 1}]},
    ),
    case(
        "negative-lora-rank",
        ("strategies[0].r", "greater than 0"),
        {"strategies": [{"name": "lora", "r": -4}]},
    ),
    case(
        "freeze-more-blocks-than-the-model-has",
        ("trainable_top_blocks is 9", "the model has 3 blocks"),
        {"strategies": [{"name": "freeze", "trainable_top_blocks": 9}]},
    ),
    case(
        "lora-targets-matching-nothing",
        ("target_modules", "'qkv_proj'"),
        {"strategies": [{"name": "lora", "target_modules": ["qkv_proj"]}]},
    ),
    case(
        "freeze-modules-matching-nothing",
        ("trainable_modules", "'decoder'"),
        {"strategies": [{"name": "freeze", "trainable_modules": ["decoder"]}]},
    ),
    case(
        "full-combined-with-lora", ("'full'", "cannot be combined", "lora"), {"strategies": ["full", "lora"]}
    ),
    case("freeze-after-lora", ("put 'freeze' before 'lora'",), {"strategies": ["lora", "freeze"]}),
    case("strategy-twice", ("appears twice",), {"strategies": ["freeze", "freeze"]}),
    # -- recipe files and YAML ------------------------------------------------------------------
    case("recipe-not-found", ("absent.yaml", "not found"), command=("train", "{W}/absent.yaml", "--fresh")),
    case("recipe-is-a-list", ("must be a mapping",), text="- model\n- data\n"),
    case("invalid-yaml", ("not valid YAML",), text="model: {source: [unclosed\n"),
    case(
        "duplicate-key",
        ("line 3", "duplicate key 'model'"),
        text="model: {source: a}\ndata: {source: b}\nmodel: {source: c}\n",
    ),
    case(
        "yes-no-boolean",
        ("line 1", "'yes'", "write true or false"),
        text="model: {source: a, gradient_checkpointing: yes}\n",
    ),
    case(
        "python-tag",
        ("line 1", "python/object/apply"),
        text="name: !!python/object/apply:os.system ['touch {W}/pwned']\n",
    ),
    case("extends-missing-parent", ("nowhere.yaml", "not found"), {"extends": "nowhere.yaml"}),
    case("extends-cycle", ("leads back to itself",), {"extends": "parent_cycle_a.yaml"}),
    # -- data files ----------------------------------------------------------------------------
    case(
        "data-file-missing",
        ("data.source", "absent.jsonl", "file not found"),
        {"data.source": "{W}/absent.jsonl"},
    ),
    case("data-file-empty", ("empty.jsonl", "the file is empty"), {"data.source": "{W}/empty.jsonl"}),
    case(
        "data-file-unsupported-type",
        ("notes.txt", "unsupported file type '.txt'", ".jsonl"),
        {"data.source": "{W}/notes.txt"},
    ),
    case(
        "data-malformed-json-row",
        ("broken.jsonl", "line 3 is not valid JSON"),
        {"data.source": "{W}/broken.jsonl"},
    ),
    case("data-header-only-csv", ("header_only.csv", "no rows"), {"data.source": "{W}/header_only.csv"}),
    case("data-one-row", ("one_row.jsonl", "at least 2 rows"), {"data.source": "{W}/one_row.jsonl"}),
    case(
        "data-missing-label-column",
        ("no_label.jsonl", "no column 'label'", "'text', 'stars'"),
        {"data.source": "{W}/no_label.jsonl"},
    ),
    case("data-wrong-text-column", ("no column 'sentence'", "'text', 'label'"), {"data.text": "sentence"}),
    case("data-dir-without-train-file", ("no_train", "no train.* file"), {"data.source": "{W}/no_train"}),
    case(
        "data-label-outside-declared-labels",
        ("three_labels.jsonl", "unknown label 'neutral'", "['neg', 'pos']"),
        {"data.source": "{W}/three_labels.jsonl", "data.labels": ["neg", "pos"]},
    ),
    case(
        "data-validation-label-unseen-in-train",
        ("validation.jsonl", "unknown label 'meh'", "['neg', 'pos']"),
        {"data.source": "{W}/split"},
    ),
    case(
        "causal-lm-on-classification-data",
        ("no column 'prompt'", "'text', 'label'"),
        {"model.task": "causal_lm", "strategies": ["full"]},
    ),
    case("unknown-transform", ("data.transforms[0]", "shout"), {"data.transforms": [{"name": "shout"}]}),
    # -- models ----------------------------------------------------------------------------------
    case("model-dir-missing", ("model.source", "absent-model'"), {"model.source": "{W}/absent-model"}),
    # -- command lines ----------------------------------------------------------------------------
    case("override-without-equals", ("train.lr", "key.sub=value"), args=("train.lr",)),
    case("override-index-out-of-range", ("out of range", "1 items"), args=("strategies.3.r=4",)),
    case("override-unknown-key", ("train.lr_rte", "unknown key"), args=("train.lr_rte=1e-3",)),
    case("override-wrong-type", ("train.epochs", "'many'"), args=("train.epochs=many",)),
    case("override-ambiguous", ("'on'", "ambiguous"), args=("model.gradient_checkpointing=on",)),
    case("unknown-command", ("invalid choice: 'trian'",), command=("trian", "{R}")),
    case("unknown-flag", ("unrecognized arguments: --resume",), command=("train", "{R}", "--resume")),
    case("train-without-recipe", ("the following arguments are required: recipe",), command=("train",)),
    case(
        "eval-of-a-missing-run",
        ("absent-run", "not a finished run directory"),
        command=("eval", "{W}/absent-run"),
    ),
    case("predict-with-an-unfinished-run", ("no final/",), command=("predict", "{W}/split", "great")),
    case(
        "unknown-packaged-model",
        ("unknown packaged model 'gpt-5'", "all-minilm-l6-v2"),
        command=("models", "fetch", "gpt-5"),
    ),
]


def test_the_catalogue_is_big_enough():
    assert len(CATALOGUE) >= 30
    assert len({p.id for p in CATALOGUE}) == len(CATALOGUE)


def prepare(work: Path, change, text, args, command) -> list[str]:
    """The argv of one entry, writing its recipe to ``bad.yaml``."""
    path = work / "bad.yaml"
    if text is not None:
        path.write_text(text.replace("{W}", str(work)))
    else:
        recipe = edit(base(work), change or {})
        path.write_text(dump_yaml(recipe).replace("{W}", str(work)))
    fill = lambda a: a.replace("{W}", str(work)).replace("{R}", str(path))  # noqa: E731
    return [fill(a) for a in command] if command else ["train", str(path), "--fresh", *map(fill, args)]


@pytest.mark.parametrize("change, text, args, command, words", CATALOGUE)
def test_bad_input_exits_2_with_one_message_and_loses_nothing(
    work, kept, capsys, monkeypatch, change, text, args, command, words
):
    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    before = snapshot(kept)
    argv = prepare(work, change, text, args, command)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, err
    message = err[
        err.index(errors[0]) :
    ]  # a recipe with several problems lists them under its one error line
    for word in words:
        assert word.replace("{W}", str(work)) in message, (word, message)
    assert snapshot(kept) == before, "a failing call changed the finished run"
    assert not (work / "pwned").exists()


SUBPROCESS_CASES = [
    "negative-lr",
    "freeze-more-blocks-than-the-model-has",
    "data-label-outside-declared-labels",
    "python-tag",
    "unknown-flag",
]


@pytest.mark.parametrize("entry_id", SUBPROCESS_CASES)
def test_as_a_real_process_too(work, kept, entry_id):
    change, text, args, command, words = next(p.values for p in CATALOGUE if p.id == entry_id)
    before = snapshot(kept)
    argv = prepare(work, change, text, args, command)
    env = {**os.environ, "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "adaptkit", *argv], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1 and all(w.replace("{W}", str(work)) in errors[0] for w in words), proc.stderr
    assert snapshot(kept) == before


# -- properties of recipe parsing and overrides ----------------------------------------------------

FLOAT_FORMS = [repr, "{:e}".format, "{:E}".format, "{:.3e}".format, "{:.17g}".format, "{:+.6e}".format]
_INT_TEXT = re.compile(r"^[-+]?[0-9]+$")


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(FLOAT_FORMS))
def test_any_float_written_in_yaml_forms_reads_as_that_float(value, form):
    text = form(value)
    got = load_yaml(f"lr: {text}")["lr"]
    if _INT_TEXT.match(text):  # "%g" of 3.0 is "3": an integer, as in YAML 1.2
        assert got == int(text) and type(got) is int
    else:
        assert got == float(text) and type(got) is float, (text, got)


@settings(max_examples=150, deadline=None)
@given(st.floats(min_value=1e-12, max_value=10.0, allow_nan=False), st.sampled_from(FLOAT_FORMS))
def test_a_learning_rate_in_any_form_validates_as_that_float(value, form):
    text = form(value)
    raw = apply_overrides(
        {"model": {"source": "m"}, "data": {"source": "d"}, "strategies": ["freeze"]}, [f"train.lr={text}"]
    )
    recipe = validate(raw)
    assert type(recipe.train.lr) is float and recipe.train.lr == float(text)


_key = st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z")
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**15), 10**15), st.floats(allow_nan=False), st.text(max_size=12)
)
_tree = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_key, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_key, _tree, max_size=5))
def test_written_yaml_reads_back_as_the_same_data(data):
    """What adaptkit writes (the resolved recipe.yaml, `validate`'s output) is read back unchanged by its
    strict loader: strings such as '2e-5', '0o7' or 'y' are quoted, numbers stay numbers."""
    assert load_yaml(dump_yaml(data)) == data


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=16))
def test_a_run_recipe_reads_back_as_the_same_recipe(name):
    recipe = validate(
        {
            "name": name,
            "model": {"source": "m", "revision": name},
            "data": {"source": "d", "text": name},
            "strategies": ["freeze"],
        }
    )
    again = validate(load_yaml(dump_yaml(recipe.model_dump(mode="json"))))
    assert again == recipe


def _paths(tree, prefix=()):
    """Every dotted path into a tree of dicts and lists, with both list-index spellings."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _spell(path, brackets: bool) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]" if brackets else f".{part}"
        else:
            out += f".{part}" if out else part
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_key, _tree, min_size=1, max_size=5), st.data())
def test_overrides_never_change_their_input_and_set_what_they_name(tree, data):
    paths = [p for p in _paths(tree)]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(
        st.one_of(
            st.integers(-1000, 1000),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
            st.text(string.ascii_letters, min_size=1, max_size=6).map(lambda s: "x" + s),
        )
    )
    text = (
        repr(value)
        if isinstance(value, float)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )
    frozen = copy.deepcopy(tree)
    out = apply_overrides(tree, [f"{_spell(path, data.draw(st.booleans()))}={text}"])
    assert tree == frozen  # the caller's mapping, nested lists and dicts included, is untouched
    node = out
    for part in path:
        node = node[part]
    assert node == value and type(node) is type(value)
    # everything else is as it was
    rest = copy.deepcopy(out)
    target = rest
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = frozen_value(frozen, path)
    assert rest == frozen


def frozen_value(tree, path):
    for part in path:
        tree = tree[part]
    return tree


SECTIONS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec}


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["", "model", "data", "train", "strategies[0]"]),
    _key,
    st.one_of(_scalar, st.lists(_scalar, max_size=2)),
)
def test_unknown_keys_are_always_reported_with_their_dotted_path(section, key, value):
    known = {
        "": Recipe.model_fields,
        "strategies[0]": {"name", *_HOST.strategy("freeze").extra["config_class"].model_fields},
    }
    fields = known.get(section) or SECTIONS[section].model_fields
    if key in fields:
        return
    raw = {"model": {"source": "m"}, "data": {"source": "d"}, "strategies": [{"name": "freeze"}]}
    if section == "strategies[0]":
        raw["strategies"][0][key] = value
    elif section:
        raw[section] = {**raw.get(section, {}), key: value}
    else:
        raw[key] = value
    with pytest.raises(ConfigError) as exc:
        validate(raw, host=_HOST)
    path = f"{section}.{key}" if section else key
    assert (path, exc.value.problems[0][1]) in exc.value.problems and len(exc.value.problems) == 1, (
        exc.value.problems
    )
    assert "unknown" in dict(exc.value.problems)[path]


_HOST = plugin_host()
