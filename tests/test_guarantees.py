"""Promises that must hold at the edges: resume across an epoch boundary, ranks in sync when the
data leaves a remainder, the trainable count under several processes, and launches adaptkit
cannot run.

Every run here is a real ``adaptkit train`` in a child process (or under ``accelerate launch``
on 2 CPU processes), killed with SIGKILL by a plugin where a test needs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adaptkit.testing import save_tiny_pretrained, write_sentiment
from adaptkit.testing.kit import adaptkit_command

# 96 rows at a micro-batch of 8: 12 steps an epoch; 16 steps cross into the second epoch.
ROWS, STEPS = 96, 16
TRAIN = f"max_steps: {STEPS}, lr: 1.0e-3, micro_batch_size: 8, save_every: 3, keep_checkpoints: 2, seed: 3"

PLUGINS = {
    # SIGKILL at the end of step KILL_AT_STEP, on every process of the run
    "killer": """
import os, signal
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_step_end(run, step, logs):
    if step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
""",
    # after step DESYNC_AT_STEP, rank 1 alone nudges one weight: its replica no longer matches
    "desync": """
import os
import torch
from adaptkit import hookimpl


@hookimpl
def adaptkit_on_step_end(run, step, logs):
    if step == int(os.environ["DESYNC_AT_STEP"]) and run.accelerator.process_index == 1:
        with torch.no_grad():
            next(run.adapted.model.parameters()).add_(1.0)
""",
    # a strategy the estimator cannot build (it refuses meta tensors): full fine-tuning otherwise
    "nometa": '''
from adaptkit import Strategy, StrategyConfig, hookimpl


class NoMeta(Strategy):
    """Full fine-tuning that refuses a model on the meta device."""

    def apply(self, model):
        if next(model.parameters()).device.type == "meta":
            raise RuntimeError("this strategy needs real weights")
        for name, p in model.named_parameters():
            p.requires_grad_(True)
            self.owned[name] = p
        return model


@hookimpl
def adaptkit_register_strategies(register):
    register("nometa", NoMeta, StrategyConfig)
''',
    # a strategy that trains the head and, on every step, one of the first two blocks in turn:
    # the other block is frozen again and pending (it will train again at the next step)
    "alternate": '''
from adaptkit import Strategy, StrategyConfig, hookimpl
from adaptkit.contract.anatomy import find_blocks, head_parameter_names


class Alternate(Strategy):
    """Train the head and one of two blocks, switching every step."""

    def apply(self, model):
        heads = set(head_parameter_names(model))
        _, blocks = find_blocks(model)
        self.blocks = [list(blocks[0].parameters()), list(blocks[1].parameters())]
        for name, p in model.named_parameters():
            p.requires_grad_(name in heads)
        in_blocks = {id(p) for block in self.blocks for p in block}
        self.owned = {n: p for n, p in model.named_parameters() if n in heads or id(p) in in_blocks}
        self.active = 0
        self._set()
        return model

    def _set(self):
        for i, block in enumerate(self.blocks):
            for p in block:
                p.requires_grad_(i == self.active)

    def on_event(self, model, event, state):
        if event != "step_start":
            return False
        self.active = state.step % 2
        self._set()
        return True

    def pending_parameters(self, model):
        return self.blocks[1 - self.active]

    def param_groups(self, model, lr):
        return [{"params": list(self.owned.values()), "lr": lr}]


@hookimpl
def adaptkit_register_strategies(register):
    register("alternate", Alternate, StrategyConfig)
''',
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("guarantees")
    save_tiny_pretrained(d / "bert", "bert")
    # each data set a directory with its own validation file, so the training split has exactly
    # the rows the step counts below assume
    for name, rows in (("even", ROWS), ("odd", 97)):  # 97 = 6 x (8 x 2) + 1: one row for the last batch
        (d / name).mkdir()
        write_sentiment(d / name / "train.jsonl", rows, seed=0)
        write_sentiment(d / name / "validation.jsonl", 16, seed=1)
    (d / "plugins").mkdir()
    for name, source in PLUGINS.items():
        (d / "plugins" / f"{name}.py").write_text(source)
    return d


def recipe(work: Path, name: str, strategies: str, train: str = TRAIN, data: str = "even") -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        f"model: {{source: {work / 'bert'}, task: classification}}\n"
        f"data: {{source: {work / data}, max_length: 16}}\n"
        f"strategies: {strategies}\n"
        f"train: {{{train}}}\n"
        f"output: {work / 'runs'}/{{name}}\n"
    )
    return path


def env(work: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "ADAPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1",
        "PYTHONPATH": str(work / "plugins"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def launch(work: Path, args: list[str], processes: int = 1, **extra: str) -> subprocess.CompletedProcess:
    """``adaptkit ARGS`` in a child process, or under ``accelerate launch`` on N CPU processes."""
    cmd = adaptkit_command(args, processes)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env(work, **extra))


def summary(work: Path, name: str) -> dict:
    return json.loads((work / "runs" / name / "summary.json").read_text())


def train_fresh(work: Path, name: str, strategies: str, processes: int = 1, **kw) -> dict:
    res = launch(work, ["train", str(recipe(work, name, strategies, **kw)), "--fresh"], processes)
    assert res.returncode == 0, res.stderr[-4000:]
    return summary(work, name)


STRATEGIES = {
    "full": "[full]",
    "lora": "[{name: lora, r: 4}]",
    "qlora": "[{name: lora, r: 4, quantize: 4bit}]",
    "adapters": "[adapters]",
    # thaws a block every 4 steps: killed at step 8 or 14, after a thaw
    "gradual_unfreeze": "[{name: gradual_unfreeze, every: 4, unit: step}]",
}
# (strategy, kill at the end of this step, the checkpoint the resumed run starts from): LoRA,
# QLoRA and adapters resume in epoch 0 and cross the boundary; full and gradual unfreezing resume
# exactly at the boundary and in the middle of the second epoch.
KILLS = [
    # full and gradual unfreezing cross the boundary in their two other cases
    *[
        pytest.param(s, 8, 6, id=f"{s}-resume-in-epoch-0-then-cross")
        for s in STRATEGIES
        if s not in ("full", "gradual_unfreeze")
    ],
    *[pytest.param(s, 14, 12, id=f"{s}-resume-at-the-boundary") for s in ("full", "gradual_unfreeze")],
    *[pytest.param(s, 16, 15, id=f"{s}-resume-mid-epoch-1") for s in ("full", "gradual_unfreeze")],
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, kill_at, resume_from", KILLS)
def test_kill_and_resume_across_an_epoch_boundary_gives_the_uninterrupted_weights(
    work, strategy, kill_at, resume_from
):
    expected = straight_run(work, strategy)
    name = f"kill_{strategy}_{kill_at}"
    path = recipe(work, name, STRATEGIES[strategy])
    run_dir = work / "runs" / name
    killed = launch(work, ["-p", "killer", "train", str(path), "--fresh"], KILL_AT_STEP=str(kill_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    resumed = launch(work, ["train", str(path)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {resume_from})" in resumed.stderr
    got = summary(work, name)
    assert (got["steps"], got["epochs_completed"]) == (STEPS, 1)
    assert got["param_digest"] == expected["param_digest"]  # bitwise the same weights
    assert got["trainable_parameters"] == expected["trainable_parameters"]


def straight_run(work: Path, strategy: str) -> dict:
    """The uninterrupted run of a strategy, trained once per module."""
    name = f"straight_{strategy}"
    if not (work / "runs" / name / "summary.json").is_file():
        return train_fresh(work, name, STRATEGIES[strategy])
    return summary(work, name)


@pytest.mark.distributed
def test_two_processes_killed_and_resumed_across_an_epoch_boundary_match_the_uninterrupted_run(work):
    """2 processes: 6 steps an epoch, killed at step 8, resumed from step 6, an epoch's first step."""
    lora = STRATEGIES["lora"]
    expected = train_fresh(work, "ddp_straight", lora, processes=2)
    assert expected["ranks_in_sync"] is True
    # the pre-flight check judged one process of two, with DDP's copy of the gradients counted
    launch_plan = expected["memory_plan"]["estimate_launch"]
    assert (launch_plan["kind"], launch_plan["num_processes"]) == ("DDP", 2)
    path = recipe(work, "ddp_killed", lora)
    killed = launch(work, ["-p", "killer", "train", str(path), "--fresh"], 2, KILL_AT_STEP="8")
    assert killed.returncode != 0
    assert not (work / "runs" / "ddp_killed" / "summary.json").exists()
    resumed = launch(work, ["train", str(path)], 2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(step 6)" in resumed.stderr
    got = summary(work, "ddp_killed")
    assert (got["steps"], got["epochs_completed"], got["ranks_in_sync"]) == (STEPS, 2, True)
    assert got["param_digest"] == expected["param_digest"]


@pytest.mark.distributed
def test_ranks_in_sync_is_false_when_one_rank_differs_even_with_a_remainder(work):
    """97 rows on 2 processes at 8 a micro-batch: the epoch's last batch leaves one row, and the
    run ends on it; rank 1 changes a weight after the last step."""
    train = "max_steps: 7, lr: 1.0e-3, micro_batch_size: 8, seed: 3"
    path = recipe(work, "desync", "[full]", train=train, data="odd")
    res = launch(work, ["-p", "desync", "train", str(path), "--fresh"], 2, DESYNC_AT_STEP="7")
    assert res.returncode == 0, res.stderr[-4000:]
    got = summary(work, "desync")
    assert got["steps"] == 7  # 13 batches of 8 shared by 2 processes: the epoch's last step
    assert got["ranks_in_sync"] is False


@pytest.mark.distributed
@pytest.mark.parametrize(
    "strategies",
    ["[{name: gradual_unfreeze, every: 3, unit: step}]", "[alternate]"],
    ids=["gradual", "refreeze"],
)
def test_trainable_parameters_are_the_same_on_one_and_two_processes(work, strategies):
    """Pending parameters require grad under DDP only for DDP's sake: the count leaves them out."""
    train = "max_steps: 5, lr: 1.0e-3, micro_batch_size: 8, seed: 3"
    name = "alt" if "alternate" in strategies else "grad"
    plugins = ["-p", "alternate"] if "alternate" in strategies else []
    counts = []
    for processes in (1, 2):
        path = recipe(work, f"count_{name}_{processes}", strategies, train=train)
        res = launch(work, [*plugins, "train", str(path), "--fresh"], processes)
        assert res.returncode == 0, res.stderr[-4000:]
        got = summary(work, path.stem)
        assert got["ranks_in_sync"] is True
        counts.append((got["trainable_parameters"], got["total_parameters"]))
    assert counts[0] == counts[1]
    assert counts[0][0] < counts[0][1]  # something stayed frozen


@pytest.mark.distributed
@pytest.mark.parametrize("flag", ["--use_fsdp"])  # --use_deepspeed stops in accelerate without deepspeed
def test_a_sharded_launch_without_gpus_is_refused_in_one_line(work, flag):
    path = recipe(
        work, f"sharded{flag.replace('-', '_')}", "[full]", train="max_steps: 2, micro_batch_size: 8"
    )
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", flag, "--num_processes", "2",
        "--main_process_port", str(29600 + os.getpid() % 1000), "-m", "adaptkit", "train", str(path),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(work))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("adaptkit: error:")]
    assert len(errors) == 1, res.stderr[-4000:]
    assert "needs GPUs" in errors[0] and "--multi_gpu" in errors[0]
    assert "adaptkit/" not in res.stderr  # no traceback through adaptkit's code
    assert not (work / "runs" / path.stem).exists()  # nothing written


@pytest.mark.distributed
def test_a_recipe_refused_under_two_processes_is_said_once(work):
    """Every process of a launch reads the same recipe and finds the same problem: one line, not two."""
    path = recipe(work, "refused_twice", "[neftune]", train="max_steps: 2, micro_batch_size: 8")
    res = launch(work, ["train", str(path)], processes=2)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("adaptkit: error:")]
    assert len(errors) == 1, res.stderr[-4000:]
    assert "only change how training runs" in errors[0]
    assert not (work / "runs" / path.stem).exists()


FRESH_INTERPRETER = r"""
import importlib.abc, json, sys


class NoAdaptkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("adaptkit", "adaptkit_plugins"):
            raise ImportError(f"{name} imported: the export must load without adaptkit")


sys.meta_path.insert(0, NoAdaptkit())
import peft, torch, transformers

merged, adapter, base, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
batch = transformers.AutoTokenizer.from_pretrained(merged)(texts, padding=True, return_tensors="pt")
auto = transformers.AutoModelForSequenceClassification
out = {}
with torch.no_grad():
    out["merged"] = auto.from_pretrained(merged).eval()(**batch).logits.tolist()
    if adapter != "-":
        config = transformers.AutoConfig.from_pretrained(merged)  # the label names travel with the export
        plain = auto.from_pretrained(base, num_labels=2, id2label=config.id2label, label2id=config.label2id)
        out["adapter"] = peft.PeftModel.from_pretrained(plain, adapter).eval()(**batch).logits.tolist()
print(json.dumps(out))
"""


EXPORTED = {
    **STRATEGIES,
    "freeze": "[{name: freeze, trainable_top_blocks: 1}]",
    # a training-only strategy leaves nothing to export: the adapter and the merge are as without it
    "lora+neftune": "[{name: lora, r: 4}, neftune]",
    "full+neftune": "[full, neftune]",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy", ["lora", "full", "freeze", "lora+neftune", "full+neftune"]
)  # adapters cannot merge
def test_exports_load_without_adaptkit_and_reproduce_the_run(work, tmp_path, strategy):
    """The merged model (plain transformers) and, for LoRA, the adapter (plain peft) give the
    run's logits in an interpreter where importing adaptkit fails."""
    import torch

    from adaptkit.host.manager import get_plugin_host
    from adaptkit.runs import open_run

    name = f"export_{strategy.replace('+', '_')}"
    train_fresh(work, name, EXPORTED[strategy], train="max_steps: 4, lr: 1.0e-2, micro_batch_size: 8")
    run_dir = work / "runs" / name
    texts = ["the movie was great", "awful and dull, the worst"]
    opened = open_run(run_dir, get_plugin_host(autoload=False))
    batch = opened.processor(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = opened.adapted.model(**batch).logits
    assert launch(work, ["export", str(run_dir), str(tmp_path / "merged"), "--merge"]).returncode == 0
    adapter = "-"
    if strategy.startswith("lora"):
        adapter = str(tmp_path / "adapter")
        assert launch(work, ["export", str(run_dir), adapter]).returncode == 0
    args = [str(tmp_path / "merged"), adapter, str(work / "bert"), json.dumps(texts)]
    res = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER, *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    for kind, logits in json.loads(res.stdout.strip().splitlines()[-1]).items():
        torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-5, rtol=1e-5, msg=kind)


@pytest.mark.slow
def test_a_skipped_estimate_is_recorded_and_reported(work):
    """The pre-flight check and micro_batch_size auto go on without an estimate they cannot make;
    summary.json and the comparison's report say so for that run, not only stderr."""
    path = work / "skip.yaml"
    path.write_text(
        f"model: {{source: {work / 'bert'}, task: classification}}\n"
        f"data: {{source: {work / 'even'}, max_length: 16}}\n"
        "strategies: [nometa]\n"
        "train: {max_steps: 2, lr: 1.0e-3, micro_batch_size: auto, effective_batch_size: 8, preflight: true}\n"
        f"output: {work / 'runs'}/{{name}}\n"
        "compare: {lr: fixed, variants: [{name: nometa}]}\n"
    )
    res = launch(work, ["-p", "nometa", "compare", str(path)])
    assert res.returncode == 0, res.stderr[-4000:]
    (summary_file,) = (work / "runs" / "skip").rglob("summary.json")
    plan = json.loads(summary_file.read_text())["memory_plan"]
    reason = plan["estimate_skipped"]
    assert "strategy 'nometa' cannot be applied" in reason and "needs real weights" in reason
    report = (work / "runs" / "skip" / "report.md").read_text()
    assert "## Memory estimates skipped" in report
    assert f"nometa (seed 0): memory estimate skipped, {reason}" in report
    assert "memory estimates skipped" in (work / "runs" / "skip" / "report.html").read_text().lower()


def launch_two_machines(work: Path, args: list[str], env_by_machine: dict[int, dict[str, str]]) -> list:
    """``adaptkit ARGS`` as two "machines" on this host: two ``accelerate launch --num_machines 2``
    commands, machine ranks 0 and 1, one CPU process each (gloo), meeting at 127.0.0.1 as the nodes
    of a cluster meet at their main node's address."""
    port = str(29700 + os.getpid() % 1000)
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "adaptkit", *args,
        ]  # fmt: skip
        extra = env_by_machine.get(rank, {})
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(work, **extra)
            )
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["lora", "gradual_unfreeze"])
def test_two_machines_train_like_two_processes_and_resume_exactly_after_one_is_killed(work, strategy):
    """Two nodes of one process each: the same weights as one machine with two processes (the data
    is sharded by global rank alike); the second node killed at step 8 takes the first down with
    it, and relaunching both resumes from the step-6 checkpoint to bitwise the same weights."""
    expected = train_fresh(work, f"one_machine_{strategy}", STRATEGIES[strategy], processes=2)
    path = recipe(work, f"two_machines_{strategy}", STRATEGIES[strategy])
    never = {"KILL_AT_STEP": "-1"}
    killed = launch_two_machines(
        work, ["-p", "killer", "train", str(path), "--fresh"], {0: never, 1: {"KILL_AT_STEP": "8"}}
    )
    assert all(r.returncode != 0 for r in killed), [r.stderr[-2000:] for r in killed]
    run_dir = work / "runs" / path.stem
    assert not (run_dir / "summary.json").exists()
    resumed = launch_two_machines(work, ["train", str(path)], {})
    assert all(r.returncode == 0 for r in resumed), [r.stderr[-3000:] for r in resumed]
    assert "(step 6)" in resumed[0].stderr  # the global main process says where it resumed
    got = summary(work, path.stem)
    assert (got["steps"], got["num_processes"], got["ranks_in_sync"]) == (STEPS, 2, True)
    assert got["param_digest"] == expected["param_digest"]
    assert got["trainable_parameters"] == expected["trainable_parameters"]
    # one writer: complete checkpoints only, no temporary directory left by a second writer
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints and not [c for c in checkpoints if c.startswith(".")], checkpoints


def test_the_multi_node_examples_are_valid_for_accelerate_and_bash():
    """What a cluster user copies: the accelerate config parses as a 2-machine DDP config, and the
    SLURM script is valid bash that launches adaptkit once per node with the machine rank from SLURM."""
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parents[1] / "examples"
    config = load_config_from_file(str(root / "accelerate" / "multi_node.yaml"))
    assert (config.num_machines, config.num_processes, config.distributed_type.value) == (2, 8, "MULTI_GPU")
    script = root / "slurm" / "train_multinode.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--machine_rank \\$SLURM_NODEID" in text and "-m adaptkit train" in text
