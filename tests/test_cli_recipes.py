"""``adaptkit validate`` as a real process: exit codes, one error line naming the field, no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptkit.recipe.yaml import load_yaml

EXE = Path(sys.executable).with_name("adaptkit")
ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
model:
  source: org/tiny-model
data:
  source: data.jsonl
strategies:
  - name: freeze
    trainable_top_blocks: 1
train:
  lr: 2e-5
  mixed_precision: "no"
"""


def adaptkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("adaptkit: error:")]


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    return proc.stderr


def test_executable_exists():
    assert EXE.is_file(), f"{EXE} is missing: pip install -e . into the venv"


def test_validate_a_good_recipe(tmp_path):
    path = recipe(tmp_path, GOOD)
    proc = adaptkit("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and not error_lines(proc)
    assert f"{path} is valid" in proc.stderr
    # the resolved recipe printed on stdout is itself a strict, valid recipe with typed values
    resolved = load_yaml(proc.stdout, source="stdout")
    assert resolved["name"] == "recipe"
    assert resolved["train"]["lr"] == 2e-5 and type(resolved["train"]["lr"]) is float
    assert resolved["train"]["mixed_precision"] == "no"
    assert resolved["strategies"] == [{"name": "freeze", "trainable_top_blocks": 1}]
    again = recipe(tmp_path, proc.stdout, name="resolved.yaml")
    assert adaptkit("validate", str(again), cwd=tmp_path).returncode == 0


def test_validate_with_overrides(tmp_path):
    path = recipe(tmp_path, GOOD)
    proc = adaptkit(
        "validate", str(path), "train.lr=1e-4", "strategies[0].trainable_top_blocks=2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    resolved = load_yaml(proc.stdout)
    assert resolved["train"]["lr"] == 1e-4
    assert resolved["strategies"][0]["trainable_top_blocks"] == 2


@pytest.mark.parametrize(
    "text, words",
    [
        (GOOD.replace("lr: 2e-5", "lr_rate: 2e-5"), ["train.lr_rate", "unknown key"]),
        (GOOD.replace("source: org/tiny-model", "sorce: org/tiny-model"), ["model.sorce", "model.source"]),
        (GOOD.replace("lr: 2e-5", "lr: -1"), ["train.lr", "greater than 0"]),
        (
            GOOD.replace("trainable_top_blocks: 1", "trainable_top_blocks: -1"),
            ["strategies[0].trainable_top_blocks"],
        ),
        (GOOD.replace("name: freeze", "name: freez"), ["strategies[0].name", "freez"]),
        (GOOD.replace('mixed_precision: "no"', "mixed_precision: fp8"), ["train.mixed_precision", "fp8"]),
        (GOOD.replace('mixed_precision: "no"', "mixed_precision: no"), ["line 10", "ambiguous"]),
        (GOOD + "train:\n  epochs: 2\n", ["line 11", "duplicate key 'train'"]),
        (GOOD + "name: !!python/object/apply:os.system ['echo pwned']\n", ["line 11", "python/object/apply"]),
        ("- just\n- a list\n", ["must be a mapping"]),
    ],
)
def test_validate_a_bad_recipe(tmp_path, text, words):
    path = recipe(tmp_path, text)
    proc = adaptkit("validate", str(path), cwd=tmp_path)
    err = assert_user_error(proc, str(path), *words)
    assert "pwned" not in proc.stdout and "pwned" not in err.replace("echo pwned", "")
    assert proc.stdout == ""


def test_several_problems_in_one_message(tmp_path):
    text = GOOD.replace("lr: 2e-5", "lr: 0\n  epochs: 0\n  micro_batch_size: 0").replace(
        "name: freeze", "name: nope"
    )
    proc = adaptkit("validate", str(recipe(tmp_path, text)), cwd=tmp_path)
    assert_user_error(
        proc, "4 problems", "train.lr", "train.epochs", "train.micro_batch_size", "strategies[0].name"
    )


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr", "key.sub=value"),
        ("strategies.5.r=1", "out of range"),
        ("train.lr=fast", "train.lr"),
        ("train.lr_rate=1e-4", "train.lr_rate"),
        ("model.trust_remote_code=true", "40-hex"),
    ],
)
def test_bad_override(tmp_path, override, words):
    proc = adaptkit("validate", str(recipe(tmp_path, GOOD)), override, cwd=tmp_path)
    assert_user_error(proc, words)


def test_missing_recipe_file(tmp_path):
    proc = adaptkit("validate", str(tmp_path / "absent.yaml"), cwd=tmp_path)
    assert_user_error(proc, "absent.yaml", "not found")


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "--no-such-flag", "r.yaml"],
        ["--bogus", "validate", "r.yaml"],
        ["validate"],
        ["frobnicate"],
    ],
)
def test_bad_command_line(tmp_path, args):
    recipe(tmp_path, GOOD, name="r.yaml")
    proc = adaptkit(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"^adaptkit( \w+)?: error: ", proc.stderr, re.M) and "usage:" in proc.stderr
    assert "key.sub=value" not in proc.stderr.split("error:", 1)[1]  # overrides are optional
