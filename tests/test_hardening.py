"""What breaks real fine-tuning runs, done for real on tiny models (issue 7).

- SIGKILL at chosen points of training and of a checkpoint save: a `-p` plugin installs a Python
  audit hook (``sys.addaudithook``) that kills its own process with SIGKILL when the save opens,
  renames or deletes a given path; the resumed run ends with the same weights as one never killed.
- A full disk: a real tmpfs filled by a plugin once the first checkpoint is complete (ENOSPC), or
  a file-size limit set by the plugin (EFBIG): one message, the previous checkpoint intact.
- Corrupted, tampered and pickled checkpoints; pickled and remote-code models; fp16 numerics;
  plugins that raise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.cli import main
from adaptkit.errors import CheckpointError, ConfigError
from adaptkit.recipe.schema import load_recipe
from adaptkit.testing import save_tiny_pretrained, write_sentiment
from adaptkit.train.checkpoint import checkpoint_dirs, verify

ADAPTKIT = [sys.executable, "-m", "adaptkit"]
# 12 steps, a checkpoint every 3, the newest 2 kept; bert-tiny trains every weight (`full`)
TRAIN = "max_steps: 12, lr: 1.0e-3, micro_batch_size: 8, save_every: 3, keep_checkpoints: 2, seed: 1, warmup_ratio: 0.2, log_every: 100"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hardening")
    save_tiny_pretrained(d / "bert", "bert")
    write_sentiment(d / "train.jsonl", 160, seed=0)
    (d / "plugins").mkdir()
    for name, source in PLUGINS.items():
        (d / "plugins" / f"{name}.py").write_text(source)
    return d


def recipe_file(
    work: Path,
    name: str,
    strategies: str = "[full]",
    train: str = TRAIN,
    output: Path | None = None,
    model: str = "",
) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {work / 'bert'}, task: classification{model}}}\n"
        f"data: {{source: {work / 'train.jsonl'}, max_length: 16}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {output or work / 'runs'}/{{name}}\n"
    )
    return path


def run_cli(work: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """adaptkit in a child process that can import the test plugins (loaded only when named with -p)."""
    full_env = {
        **os.environ,
        "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
        "PYTHONPATH": str(work / "plugins"),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run([*ADAPTKIT, *args], capture_output=True, text=True, timeout=300, env=full_env)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("adaptkit: error:")]


def reference_dir(work: Path, strategies: str = "[full]") -> Path:
    """The run directory of an uninterrupted run of ``strategies``, trained once, in a child process like the others."""
    run_dir = work / "runs" / ("ref_" + hashlib.sha1(strategies.encode()).hexdigest()[:8])
    if not (run_dir / "summary.json").is_file():
        res = run_cli(work, "train", str(recipe_file(work, run_dir.name, strategies)), "--fresh")
        assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def reference(work: Path, strategies: str = "[full]") -> dict:
    """The summary of the uninterrupted run."""
    return summary(reference_dir(work, strategies))


PLUGINS = {
    # SIGKILL at a chosen point: KILL_EVENT is an audit event ("open", "os.rename", "shutil.rmtree")
    # whose first argument (a path) matches the regex KILL_PATH, or "step_end" with KILL_PATH the step.
    "killer": """
import os, re, signal, sys
from adaptkit import hookimpl

EVENT, PATH = os.environ.get("KILL_EVENT", ""), os.environ.get("KILL_PATH", "")


def _audit(event, args):
    if event == EVENT and args and isinstance(args[0], (str, bytes, os.PathLike)) and re.search(PATH, os.fsdecode(args[0])):
        os.kill(os.getpid(), signal.SIGKILL)


if EVENT and EVENT != "step_end":
    sys.addaudithook(_audit)


@hookimpl
def adaptkit_on_step_end(run, step, logs):
    if EVENT == "step_end" and step == int(PATH):
        os.kill(os.getpid(), signal.SIGKILL)
""",
    # Once the checkpoint of FULL_AT_STEP is complete, the disk is full: FULL_MODE "fill" writes
    # a ballast file into FULL_DIR (a small tmpfs) until ENOSPC; "fsize" lowers RLIMIT_FSIZE so any
    # file over 2 kB fails with EFBIG.
    "disk_filler": """
import errno, os, resource
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_checkpoint(run, step, path):
    if step != int(os.environ["FULL_AT_STEP"]):
        return
    if os.environ["FULL_MODE"] == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return
    with open(os.path.join(os.environ["FULL_DIR"], "ballast"), "wb") as f:
        try:
            while True:
                f.write(b"\\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
""",
    "raises_at_start": """
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_train_start(run):
    raise RuntimeError("the tracking server is down")
""",
    "raises_at_step": """
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_step_end(run, step, logs):
    raise ValueError(f"cannot log step {step}")
""",
    "unknown_hook": """
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_save(run):
    pass
""",
    "from_the_future": """
ADAPTKIT_API = 99
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_train_end(run, summary):
    pass
""",
}


# -- SIGKILL during training and during a checkpoint save -------------------------------------

T9 = r"/\.tmp-step-00000009/"
KILL_POINTS = [
    # (audit event, path regex or step, the checkpoint the resumed run must start from, what the kill left)
    # (a kill between saves, mid-training, is tests/test_guarantees.py's, for every strategy)
    pytest.param(
        "open",
        r"/\.tmp-step-00000003/\.rng-0\.safetensors\.",
        None,
        ".tmp-step-00000003",
        id="first-save-before-any-file",
    ),
    pytest.param("open", T9 + r"\.rng-0\.safetensors\.", 6, ".tmp-step-00000009", id="rng-state"),
    pytest.param(
        "open",
        T9 + r"\.model\.[^/]+/full/\.weights\.safetensors\.",
        6,
        ".tmp-step-00000009",
        id="model-weights",
    ),
    pytest.param("open", T9 + r"\.optimizer\.safetensors\.", 6, ".tmp-step-00000009", id="optimizer-state"),
    pytest.param("open", T9 + r"\.manifest\.json\.", 6, ".tmp-step-00000009", id="manifest"),
    pytest.param("os.rename", r"/\.tmp-step-00000009$", 6, ".tmp-step-00000009", id="complete-before-rename"),
    pytest.param(
        "shutil.rmtree", r"/checkpoints/step-00000003$", 9, "step-00000003", id="renamed-before-rotation"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("event, where, resume_step, left", KILL_POINTS)
def test_sigkill_then_resume_gives_the_uninterrupted_weights(work, event, where, resume_step, left):
    expected = reference(work)
    name = "kill_" + hashlib.sha1(f"{event} {where}".encode()).hexdigest()[:8]
    path = recipe_file(work, name)
    run_dir = work / "runs" / name
    root = run_dir / "checkpoints"
    shutil.rmtree(run_dir, ignore_errors=True)

    killed = run_cli(work, "-p", "killer", "train", str(path), env={"KILL_EVENT": event, "KILL_PATH": where})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    # the kill happened where intended: the half-written save is there, the newest complete one is older
    complete = [p.name for p in checkpoint_dirs(root) if (p / "manifest.json").is_file()]
    if left is not None:
        assert (root / left).is_dir(), sorted(p.name for p in root.iterdir())
    if left and left.startswith(".tmp"):  # killed mid-save: the checkpoint never got its real name
        assert not (root / left.removeprefix(".tmp-")).exists()
    assert complete[-1:] == ([f"step-{resume_step:08d}"] if resume_step else []), complete
    if event == "shutil.rmtree":
        assert complete == ["step-00000003", "step-00000006", "step-00000009"]

    resumed = run_cli(work, "train", str(path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if resume_step:
        assert f"resuming from {root / f'step-{resume_step:08d}'} (step {resume_step})" in resumed.stderr
    else:
        assert "resuming" not in resumed.stderr
    got = summary(run_dir)
    assert got["steps"] == 12
    assert got["param_digest"] == expected["param_digest"]
    assert got["final_metrics"] == pytest.approx(expected["final_metrics"])
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000009", "step-00000012"]
    assert not list(root.glob(".tmp-*")), "leftovers of the killed save were not cleaned up"


# -- a full disk while saving ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (the run fills it itself); skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({res.stderr.strip() or 'not root'}); the EFBIG case still runs"
        )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, strategies",
    [("fill", "[full]"), ("fill", "[lora]"), ("fsize", "[full]")],
    ids=["enospc-full", "enospc-lora-adapter", "efbig-full"],
)
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(work, tmp_path, request, mode, strategies):
    disk = request.getfixturevalue("small_disk") if mode == "fill" else tmp_path
    expected = reference(work, strategies)
    path = recipe_file(work, f"full_disk_{mode}_{strategies.strip('[]')}", strategies, output=disk / "runs")
    run_dir = disk / "runs" / path.stem
    root = run_dir / "checkpoints"

    res = run_cli(
        work,
        "-p",
        "disk_filler",
        "train",
        str(path),
        env={"FULL_AT_STEP": "3", "FULL_MODE": mode, "FULL_DIR": str(disk)},
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    reason = os.strerror(errno.ENOSPC if mode == "fill" else errno.EFBIG)
    (line,) = error_lines(res.stderr)
    assert line.startswith(f"adaptkit: error: cannot write {root / 'step-00000006'}: {reason}"), line
    assert line.endswith(
        f"the partial checkpoint was removed and the previous checkpoint {root / 'step-00000003'} is kept; "
        "free some space and run the same command again to resume from it"
    ), line
    assert [p.name for p in checkpoint_dirs(root)] == ["step-00000003"]
    assert verify(root / "step-00000003")["step"] == 3  # every file intact, as its manifest says
    assert not list(root.glob(".*")), "the partial checkpoint was left behind"
    assert not (run_dir / "summary.json").exists()

    (disk / "ballast").unlink(missing_ok=True)  # space again (a new process has no file-size limit)
    again = run_cli(work, "train", str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {root / 'step-00000003'} (step 3)" in again.stderr
    assert summary(run_dir)["param_digest"] == expected["param_digest"]


# -- corrupted and tampered checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished(work) -> Path:
    """A finished run with checkpoints at steps 9 and 12 (the uninterrupted reference)."""
    return reference_dir(work)


def copy_run(work: Path, finished: Path, name: str) -> tuple[Path, Path]:
    """A copy of the finished run under a new name, and a recipe that trains into it (the same run id)."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(finished, run_dir)
    return recipe_file(work, name), run_dir


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who can write the checkpoint can also do: make the manifest match again."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = {
        str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_flipped_bit_in_the_newest_checkpoint_is_detected_and_the_older_one_used(work, finished):
    path, run_dir = copy_run(work, finished, "bitflip")
    root = run_dir / "checkpoints"
    weights = root / "step-00000012" / "model" / "full" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # the same size, one bit of one weight
    weights.write_bytes(bytes(data))
    (run_dir / "summary.json").unlink()

    res = run_cli(work, "train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        f"adaptkit: skipping checkpoint: {root / 'step-00000012'}: model/full/weights.safetensors is corrupted "
        "(its checksum does not match the manifest)"
    ) in res.stderr
    assert f"resuming from {root / 'step-00000009'} (step 9)" in res.stderr
    assert summary(run_dir)["param_digest"] == summary(finished)["param_digest"]


@pytest.mark.parametrize(
    "damage, words",
    [
        ("manifest-not-json", "manifest.json is not valid JSON"),
        ("manifest-without-files", "manifest.json has no 'files' mapping"),
        ("file-deleted", "optimizer.safetensors is missing"),
        ("file-truncated", "optimizer.safetensors is corrupted"),
        ("file-added", "optimizer.pt is not listed in manifest.json"),
        ("no-manifest", "incomplete checkpoint (no manifest.json)"),
    ],
)
def test_damaged_checkpoints_are_refused_by_their_manifest(work, finished, tmp_path, damage, words):
    ckpt = tmp_path / "step-00000012"
    shutil.copytree(finished / "checkpoints" / "step-00000012", ckpt)
    assert verify(ckpt)["step"] == 12
    opt = ckpt / "optimizer.safetensors"
    if damage == "manifest-not-json":
        (ckpt / "manifest.json").write_text('{"files": ')
    elif damage == "manifest-without-files":
        (ckpt / "manifest.json").write_text('{"step": 12}')
    elif damage == "file-deleted":
        opt.unlink()
    elif damage == "file-truncated":
        opt.write_bytes(opt.read_bytes()[:-1])
    elif damage == "file-added":
        (ckpt / "optimizer.pt").write_bytes(b"anything")
    else:
        (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as exc:
        verify(ckpt)
    assert str(exc.value).startswith(f"{ckpt}: {words}"), str(exc.value)


# -- security: pickles are never executed ------------------------------------------------------


class Payload:
    """Unpickling this creates a file: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_payload_is_live(tmp_path):
    """The control: unpickling the payload does create its file, so its absence below means something."""
    import torch

    sentinel = tmp_path / "created"
    pickle.loads(pickle.dumps(Payload(sentinel)))
    assert sentinel.exists()
    sentinel.unlink()
    torch.save({"rng": Payload(sentinel)}, tmp_path / "rng.pth")
    torch.load(tmp_path / "rng.pth", weights_only=False)
    assert sentinel.exists()


def test_a_pickled_rng_file_in_a_checkpoint_is_never_executed(work, finished, capsys, monkeypatch):
    """The RNG state replaced by a pickle (its manifest entry forged to match): resume refuses, nothing runs."""
    import torch

    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    path, run_dir = copy_run(work, finished, "pickled_rng")
    ckpt = run_dir / "checkpoints" / "step-00000012"
    sentinel = work / "pwned_rng"
    torch.save({"torch": Payload(sentinel)}, ckpt / "rng-0.safetensors")
    rewrite_manifest(ckpt)
    before = (run_dir / "summary.json").read_bytes()

    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert not sentinel.exists()
    (line,) = error_lines(err)
    assert line.startswith(
        f"adaptkit: error: {ckpt / 'rng-0.safetensors'}: not a readable safetensors file"
    ), line
    assert (run_dir / "summary.json").read_bytes() == before


def test_pickles_dropped_next_to_a_checkpoint_are_never_read(work, finished, capsys, monkeypatch):
    """Files accelerate or torch would load (optimizer.bin, random_states_0.pkl) are not adaptkit's: an unlisted
    one makes the checkpoint fail verification; a forged listing still gets them ignored, never unpickled."""
    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    path, run_dir = copy_run(work, finished, "dropped_pickles")
    root = run_dir / "checkpoints"
    sentinel = work / "pwned_dropped"
    for ckpt in ("step-00000009", "step-00000012"):
        for name in ("optimizer.bin", "random_states_0.pkl", "model/full/pytorch_model.bin"):
            (root / ckpt / name).write_bytes(pickle.dumps(Payload(sentinel)))
    rewrite_manifest(root / "step-00000009")  # forged: step 9 verifies again, step 12 does not
    (run_dir / "summary.json").unlink()

    assert main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    assert not sentinel.exists()
    assert (
        f"skipping checkpoint: {root / 'step-00000012'}: model/full/pytorch_model.bin is not listed in manifest.json"
        in err
    )
    assert f"resuming from {root / 'step-00000009'} (step 9)" in err
    assert summary(run_dir)["param_digest"] == summary(finished)["param_digest"]


def test_a_pickled_final_state_is_refused_by_eval(work, finished, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    _, run_dir = copy_run(work, finished, "pickled_final")
    sentinel = work / "pwned_final"
    weights = run_dir / "final" / "full" / "weights.safetensors"
    weights.write_bytes(pickle.dumps(Payload(sentinel)))
    assert main(["eval", str(run_dir)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"adaptkit: error: {weights}: not a readable safetensors file"), line
    assert not sentinel.exists()


def bin_model(work: Path, name: str, extra: dict | None = None) -> Path:
    """The tiny bert with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(work / "bert", d)
    weights = load_file(str(d / "model.safetensors"))
    torch.save({**weights, **(extra or {})}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_bin_weights_are_refused_unless_allowed(work, host, capsys):
    from adaptkit_plugins.loaders.transformers import from_pretrained
    from adaptkit_plugins.tasks import Classification

    clean = bin_model(work, "bert_bin")
    recipe = load_recipe(recipe_file(work, "bin", model=""), host=host)
    task = Classification(recipe.data)
    task.names, task.ids = ["neg", "pos"], {"neg": 0, "pos": 1}
    spec = recipe.model.model_copy(update={"source": str(clean)})
    with pytest.raises(ConfigError) as exc:
        from_pretrained(str(clean), spec, task)
    assert str(exc.value) == (
        f"model.allow_bin: '{clean}' has only pickled PyTorch weights (pytorch_model.bin) and no "
        "safetensors; unpickling can run code, so adaptkit refuses them unless the recipe sets allow_bin: true"
    )
    # allowed: the same weights load (through torch.load(weights_only=True))
    loaded = from_pretrained(str(clean), spec.model_copy(update={"allow_bin": True}), task)
    import torch
    from safetensors.torch import load_file

    expected = load_file(str(work / "bert" / "model.safetensors"))
    got = loaded.model.state_dict()
    assert torch.equal(
        got["bert.encoder.layer.0.attention.self.query.weight"],
        expected["encoder.layer.0.attention.self.query.weight"],
    )

    # allowed, but the pickle holds a payload: refused by weights_only loading, nothing runs
    sentinel = work / "pwned_bin"
    evil = bin_model(work, "bert_evil_bin", {"extra": Payload(sentinel)})
    with pytest.raises(ConfigError) as exc:
        from_pretrained(str(evil), spec.model_copy(update={"source": str(evil), "allow_bin": True}), task)
    assert "model.allow_bin" in str(exc.value) and "could run code" in str(exc.value)
    assert not sentinel.exists()


def test_bin_weights_through_the_cli_are_one_clear_error(work, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    model = bin_model(work, "bert_bin_cli")
    path = recipe_file(work, "bin_cli")
    assert main(["train", str(path), f"model.source={model}"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "model.allow_bin" in line and "pytorch_model.bin" in line and "allow_bin: true" in line


def remote_code_model(work: Path, sentinel: Path) -> Path:
    """A local model whose config maps the auto classes to Python files shipped with it."""
    d = work / "bert_custom"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(work / "bert", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "sneaky_bert"
    cfg["auto_map"] = {
        "AutoConfig": "configuration_sneaky.SneakyConfig",
        "AutoModelForSequenceClassification": "modeling_sneaky.SneakyModel",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_sneaky.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n"
        "from transformers import BertConfig\n\n\nclass SneakyConfig(BertConfig):\n    model_type = 'sneaky_bert'\n"
    )
    (d / "modeling_sneaky.py").write_text(
        "from transformers import BertForSequenceClassification\n\nfrom .configuration_sneaky import SneakyConfig\n\n\n"
        "class SneakyModel(BertForSequenceClassification):\n    config_class = SneakyConfig\n"
    )
    return d


def test_the_loader_refuses_remote_code_without_the_flag(work, host, tmp_path, monkeypatch):
    from adaptkit_plugins.loaders.transformers import from_pretrained
    from adaptkit_plugins.tasks import Classification

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    sentinel = tmp_path / "remote_code_ran"
    model = remote_code_model(work, sentinel)
    recipe = load_recipe(recipe_file(work, "remote_loader"), host=host)
    task = Classification(recipe.data)
    task.names, task.ids = ["neg", "pos"], {"neg": 0, "pos": 1}
    with pytest.raises(ConfigError) as exc:
        from_pretrained(str(model), recipe.model.model_copy(update={"source": str(model)}), task)
    assert str(exc.value) == (
        f"model.trust_remote_code: '{model}' ships its own Python code (auto_map in its config), "
        "which adaptkit runs only when the recipe sets trust_remote_code: true"
    )
    assert not sentinel.exists()


@pytest.mark.slow
def test_remote_code_runs_only_when_the_recipe_says_so(work, tmp_path):
    sentinel = tmp_path / "remote_code_ran"
    model = remote_code_model(work, sentinel)
    path = recipe_file(work, "remote", train="max_steps: 1, micro_batch_size: 8")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # transformers copies the code here to import it
    refused = run_cli(work, "train", str(path), f"model.source={model}", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    (line,) = error_lines(refused.stderr)
    # the memory pre-flight may read the config before the loader does: either names the model and its code
    assert str(model) in line and ("trust_remote_code" in line or "custom code" in line), line
    assert not sentinel.exists()
    # the control: with the flag (a local directory needs no pinned revision) the shipped code does run
    allowed = run_cli(
        work, "train", str(path), f"model.source={model}", "model.trust_remote_code=true", env=env
    )
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert sentinel.exists()


# -- numerics: fp16 --------------------------------------------------------------------------


def test_fp16_mixed_precision_on_the_cpu_is_refused_before_anything_is_touched(work, host, finished):
    from adaptkit.train.loop import train

    path, run_dir = copy_run(work, finished, "fp16_cpu")
    before = (run_dir / "summary.json").read_bytes()
    with pytest.raises(ConfigError) as exc:
        train(load_recipe(path, ["train.mixed_precision=fp16"], host=host), host, fresh=True)
    assert str(exc.value) == (
        "train.mixed_precision: fp16 needs a GPU (Accelerate has no fp16 autocast on the CPU); "
        "on the CPU use bf16 or no"
    )
    assert (run_dir / "summary.json").read_bytes() == before


def test_float16_weights_train_in_float32_under_autocast(work, host, capsys):
    """model.dtype float16: the trainable block is upcast to float32 (and said so), the frozen weights stay
    float16 and bitwise unchanged, and the run ends where a float32 run does, within fp16 rounding."""
    import torch

    from adaptkit.runs import open_run
    from adaptkit.train.loop import train

    train_spec = "max_steps: 8, lr: 1.0e-2, micro_batch_size: 16, log_every: 1, seed: 0"
    strategies = "[{name: freeze, trainable_top_blocks: 1}]"
    half = train(
        load_recipe(
            recipe_file(work, "fp16_weights", strategies, train_spec, model=", dtype: float16"), host=host
        ),
        host,
        fresh=True,
    )
    err = capsys.readouterr().err
    assert "adaptkit: upcasting 18 trainable tensors to float32 (e.g. bert.encoder.layer.2." in err
    assert "adaptkit: the frozen weights stay float16; the forward pass runs under autocast" in err
    full = train(
        load_recipe(recipe_file(work, "fp32_weights", strategies, train_spec), host=host), host, fresh=True
    )

    opened = open_run(work / "runs" / "fp16_weights", host)
    params = dict(opened.adapted.model.named_parameters())
    from safetensors.torch import load_file

    saved = load_file(str(work / "runs" / "fp16_weights" / "final" / "freeze" / "weights.safetensors"))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # trained in float32
    base = load_file(str(work / "bert" / "model.safetensors"))
    frozen = params["bert.encoder.layer.0.attention.self.query.weight"]
    assert frozen.dtype == torch.float16
    assert torch.equal(frozen, base["encoder.layer.0.attention.self.query.weight"].half())
    assert not torch.equal(
        saved["bert.encoder.layer.2.output.dense.weight"], base["encoder.layer.2.output.dense.weight"]
    )
    assert half["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=2e-2)
    assert half["final_metrics"]["eval_loss"] == pytest.approx(full["final_metrics"]["eval_loss"], rel=2e-2)


# -- plugins that misbehave ----------------------------------------------------------------------


@pytest.fixture
def plugin_path(work, monkeypatch):
    monkeypatch.syspath_prepend(str(work / "plugins"))
    monkeypatch.setenv("ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    yield
    for name in PLUGINS:
        sys.modules.pop(name, None)


def test_a_plugin_raising_in_train_start_stops_the_run_naming_itself(work, plugin_path, capsys):
    path = recipe_file(work, "plugin_start", train="max_steps: 2, micro_batch_size: 8")
    assert main(["-p", "raises_at_start", "train", str(path), "--fresh"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (
        "adaptkit: error: plugin 'raises_at_start' (raises_at_start) failed in adaptkit_on_train_start: "
        "RuntimeError: the tracking server is down"
    )


def test_a_plugin_raising_in_a_notification_is_named_and_the_run_goes_on(work, plugin_path, capsys):
    path = recipe_file(work, "plugin_step", train="max_steps: 2, micro_batch_size: 8")
    assert main(["-p", "raises_at_step", "train", str(path), "--fresh"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "raises_at_step" in line] == [
        f"adaptkit: plugin 'raises_at_step' (raises_at_step) failed in adaptkit_on_step_end: ValueError: cannot log step {s}"
        for s in (1, 2)
    ]
    assert summary(work / "runs" / "plugin_step")["steps"] == 2


@pytest.mark.parametrize(
    "plugin, words",
    [
        ("unknown_hook", "'adaptkit_on_save' is not an adaptkit hook"),
        (
            "from_the_future",
            "needs adaptkit plugin API 99, but adaptkit 0.1.0 provides API 1; upgrade adaptkit",
        ),
    ],
)
def test_a_plugin_that_cannot_work_is_refused_at_load(work, plugin_path, capsys, plugin, words):
    assert main(["-p", plugin, "plugins"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if f"plugin '{plugin}'" in line]
    assert len(warnings) == 1 and words in warnings[0] and "failed to load" in warnings[0], err
    assert f"{plugin}  [-p, {plugin}]  broken" in out
