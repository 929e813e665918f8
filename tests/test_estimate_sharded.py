"""The per-process estimate of a run launched on several processes (``adaptkit estimate
--num-processes N [--fsdp]`` or ``--accelerate-config FILE``): FSDP2's sharded terms and gathered
working set by hand, DDP's buckets, one process unchanged, the config file read as the flags, and
the CLI's refusals. Real transformers configs on the meta device; no GPU is needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptkit.cli import main
from adaptkit.errors import ConfigError
from adaptkit.estimate.estimator import Estimator
from adaptkit.estimate.launch import Launch, launch_from_flags, launch_of, read_accelerate_config
from adaptkit.recipe.schema import validate

# a small LLaMA: 2 blocks, hidden 64, MLP 128, 4 heads of 16, 2 key/value heads, vocabulary 128, untied
V, H, I, HEADS, KVD, LAYERS = 128, 64, 128, 4, 32, 2  # noqa: E741 (the paper-style names)
# (rows, values per row) of every parameter, as transformers lays them out
BLOCK_SHAPES = [(H, H), (KVD, H), (KVD, H), (H, H), (I, H), (I, H), (H, I), (H, 1), (H, 1)]
SHAPES = [(V, H)] + LAYERS * BLOCK_SHAPES + [(H, 1), (V, H)]  # embeddings, blocks, final norm, lm_head
BLOCK_PARAMS = sum(r * c for r, c in BLOCK_SHAPES)
PARAMS = sum(r * c for r, c in SHAPES)
FSDP_YAML = """\
distributed_type: FSDP
num_processes: {n}
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: {reshard}
"""
CUDA = ["--device", "cuda", "--device-memory", "80GB", "--peak-tflops", "0"]


def llama_config(tied: bool):
    """The test's LLaMA shape, with or without the output layer tied to the embeddings."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KVD // (H // HEADS),
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):

    d = tmp_path_factory.mktemp("sharded") / "llama"
    llama_config(tied=False).save_pretrained(d)
    return d


def recipe(source, strategies, host, **train):
    raw = {
        "model": {"source": str(source), "task": "causal_lm"},
        "data": {"source": "unused.jsonl", "max_length": 16},
        "strategies": strategies,
        "train": {"micro_batch_size": 2, **train},
    }
    return validate(raw, host=host)


def estimate(host, r, launch=None):
    return Estimator(host, device="cuda", overhead_bytes=0, peak_tflops=0, launch=launch).estimate(r)


def fsdp(n, reshard=True):
    return Launch(num_processes=n, sharding="fsdp", reshard_after_forward=reshard, source="test")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategies", [["full"], [{"name": "lora", "r": 4}]])
def test_sharded_terms_are_the_one_process_terms_over_n(llama_dir, host, strategies):
    r = recipe(llama_dir, strategies, host)
    one, four = estimate(host, r), estimate(host, r, fsdp(4))
    # every tensor's rows divide by 4 here, so each process holds exactly a quarter
    for term in ("frozen_weights", "trainable_weights", "gradients", "optimizer_states"):
        assert getattr(four, term) * 4 == getattr(one, term), term
    assert four.activations == one.activations and four.lora_dropout == one.lora_dropout
    assert four.launch["description"] == "per process, 4 processes, FSDP full shard (an estimate)"


def test_shards_round_up_to_whole_rows_per_tensor(llama_dir, host):
    one = estimate(host, recipe(llama_dir, ["full"], host))
    three = estimate(host, recipe(llama_dir, ["full"], host), fsdp(3))
    per_process = sum(-(-rows // 3) * cols for rows, cols in SHAPES)  # ceil(rows / 3) rows each
    assert three.trainable_weights == three.gradients == 4 * per_process
    assert three.optimizer_states == 8 * per_process  # AdamW's two float32 moments
    assert 4 * per_process > one.trainable_weights / 3  # rounded up, not down


def test_gathered_units_are_the_two_largest_blocks_and_the_root(llama_dir, host):
    import transformers

    from adaptkit.contract.anatomy import find_blocks

    with __import__("torch").device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(llama_dir)
        )
    block_bytes = max(4 * sum(p.numel() for p in b.parameters()) for b in find_blocks(model)[1])
    assert block_bytes == 4 * BLOCK_PARAMS
    root = 4 * (H + V * H)  # the final norm and the untied lm_head: the tail group, gathered all step
    full = estimate(host, recipe(llama_dir, ["full"], host), fsdp(4))
    assert full.gathered_parameters == 2 * block_bytes + root  # the block computing and the next
    assert full.unsharded_gradients == block_bytes + root
    bf16 = estimate(host, recipe(llama_dir, ["full"], host, mixed_precision="bf16"), fsdp(4))
    assert bf16.gathered_parameters == (2 * block_bytes + root) // 2  # gathered in FSDP's param_dtype
    # reshard_after_forward false (SHARD_GRAD_OP): every unit stays gathered, the embeddings' too
    kept = estimate(host, recipe(llama_dir, ["full"], host), fsdp(4, reshard=False))
    assert kept.gathered_parameters == 4 * PARAMS
    # LoRA: the frozen block weights are gathered too, only the adapters' gradients are whole
    lora = estimate(host, recipe(llama_dir, [{"name": "lora", "r": 4}], host), fsdp(4))
    assert lora.gathered_parameters > 2 * block_bytes + root
    assert 0 < lora.unsharded_gradients < block_bytes


def test_tied_embeddings_stay_gathered_with_the_tail(tmp_path, host):

    llama_config(tied=True).save_pretrained(tmp_path / "tied")
    est = estimate(host, recipe(tmp_path / "tied", ["full"], host), fsdp(4))
    assert est.gathered_parameters == 2 * 4 * BLOCK_PARAMS + 4 * (H + V * H)  # final norm, shared embeddings


def test_ddp_adds_exactly_the_buckets(llama_dir, host):
    for strategies, trainable in ((["full"], PARAMS), ([{"name": "lora", "r": 4}], None)):
        r = recipe(llama_dir, strategies, host)
        one, two = estimate(host, r), estimate(host, r, Launch(num_processes=2))
        trainable = trainable or one.trainable_parameters
        assert two.ddp_buckets == 4 * trainable  # a float32 copy of every trainable gradient
        assert two.total == one.total + two.ddp_buckets
        assert {k: v for k, v in two.terms().items() if k != "ddp_buckets"} == one.terms()
        assert two.launch["kind"] == "DDP" and two.launch["one_process_total"] == one.total


def test_one_process_is_the_estimate_unchanged(llama_dir, host, tmp_path):
    r = recipe(llama_dir, ["full"], host)
    plain = estimate(host, r)
    assert estimate(host, r, launch_from_flags("1", False, None)) == plain
    config = write(tmp_path / "one.yaml", "distributed_type: 'NO'\nnum_processes: 1\n")
    assert estimate(host, r, read_accelerate_config(config)) == plain
    out = plain.to_dict()
    assert "launch" not in out and "ddp_buckets" not in out and list(plain.terms()) == list(plain.TERMS)


def test_the_launch_of_a_running_accelerator(host):
    from accelerate import Accelerator

    assert launch_of(Accelerator(cpu=True)).single


def test_a_deepspeed_launch_is_not_estimated_as_ddp():
    """The estimate models one process, DDP and FSDP2; a ZeRO run must not be checked as a replica."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    ddp = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    assert launch_of(ddp).num_processes == 2 and launch_of(ddp).sharding == "none"
    deepspeed = SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ConfigError, match="does not model DEEPSPEED launches"):
        launch_of(deepspeed)


# -- the accelerate config --------------------------------------------------------------------


def test_accelerate_config_reads_as_the_flags(llama_dir, host, tmp_path):
    r = recipe(llama_dir, ["full"], host)
    config = read_accelerate_config(write(tmp_path / "f.yaml", FSDP_YAML.format(n=4, reshard="true")))
    flags = launch_from_flags("4", True, None)
    assert (config.num_processes, config.sharding, config.reshard_after_forward, config.wrap) == (
        flags.num_processes,
        flags.sharding,
        flags.reshard_after_forward,
        flags.wrap,
    )
    a, b = estimate(host, r, config), estimate(host, r, flags)
    a.launch.pop("source"), b.launch.pop("source")
    assert a == b
    ddp = write(tmp_path / "d.yaml", "distributed_type: MULTI_GPU\nnum_processes: 8\nnum_machines: 2\n")
    assert estimate(host, r, read_accelerate_config(ddp)).total == estimate(host, r, Launch(8)).total
    example = read_accelerate_config(str(Path(__file__).parent.parent / "examples/accelerate/fsdp.yaml"))
    assert (example.num_processes, example.sharding, example.wrap) == (4, "fsdp", "blocks")
    grad_op = tmp_path / "g.yaml"
    grad_op.write_text(FSDP_YAML.format(n=2, reshard="false"))
    assert read_accelerate_config(str(grad_op)).kind == "FSDP shard grad op"


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def recipe_file(tmp_path, llama_dir):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{source: {llama_dir}, task: causal_lm}}\n"
        "data: {source: unused.jsonl, max_length: 16}\n"
        "strategies: [full]\ntrain: {micro_batch_size: 2}\n"
        f"output: {tmp_path / 'runs'}/{{name}}\n"
    )
    return str(path)


def test_cli_fsdp_table_and_json(recipe_file, host, llama_dir, capsys):
    assert main(["estimate", recipe_file, "--num-processes", "4", "--fsdp", *CUDA]) == 0
    out = capsys.readouterr().out
    assert "per process, 4 processes, FSDP full shard (an estimate), from --num-processes 4 --fsdp" in out
    assert "\n  gathered parameters " in out and "\n  unsharded gradients " in out
    assert "rounded up to whole rows" in out
    assert main(["estimate", recipe_file, "--num-processes", "4", "--fsdp", *CUDA, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["estimate"]
    direct = Estimator(host, device="cuda", overhead_bytes=report["overhead"], peak_tflops=0, launch=fsdp(4))
    est = direct.estimate(recipe(llama_dir, ["full"], host))
    for key in ("total", "gathered_parameters", "unsharded_gradients", "gradients", "optimizer_states"):
        assert report[key] == getattr(est, key), key
    assert report["launch"]["num_processes"] == 4 and report["launch"]["kind"] == "FSDP full shard"


def test_cli_without_the_flags_prints_what_it_printed(recipe_file, capsys):
    args = ["estimate", recipe_file, *CUDA]  # CUDA's fixed overhead: no CPU baseline to measure
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--num-processes", "1"]) == 0
    assert capsys.readouterr().out == plain and "per process" not in plain
    assert main([*args, "--json"]) == 0
    assert "launch" not in json.loads(capsys.readouterr().out)["estimate"]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--num-processes", "0"], "--num-processes: '0' is not a number of processes"),
        (["--num-processes", "two"], "--num-processes: 'two' is not a number of processes"),
        (["--fsdp"], "--fsdp: give the number of processes"),
        (["--num-processes", "2", "--fsdp", "--device", "cpu"], "--fsdp: FSDP runs on GPUs"),
        (
            ["--accelerate-config", "{dir}/nowhere.yaml"],
            "--accelerate-config {dir}/nowhere.yaml: cannot read it",
        ),
        (["--accelerate-config", "{dir}/bad.yaml"], "--accelerate-config {dir}/bad.yaml: is not YAML"),
        (["--accelerate-config", "{dir}/ds.yaml"], "distributed_type DEEPSPEED is not modelled"),
        (["--accelerate-config", "{dir}/v1.yaml"], "{dir}/v1.yaml: fsdp_config.fsdp_version is 1"),
        (
            ["--accelerate-config", "{dir}/ds.yaml", "--num-processes", "2"],
            "--accelerate-config and --num-processes",
        ),
    ],
)
def test_cli_bad_launch_exits_2_naming_the_flag_or_file(recipe_file, tmp_path, capsys, flags, named):
    write(tmp_path / "bad.yaml", "distributed_type: [FSDP\n")
    write(tmp_path / "ds.yaml", "distributed_type: DEEPSPEED\nnum_processes: 2\n")
    write(tmp_path / "v1.yaml", "distributed_type: FSDP\nnum_processes: 2\nfsdp_config: {}\n")
    flags = [f.format(dir=tmp_path) for f in flags]
    assert main(["estimate", recipe_file, "--device-memory", "1GB", *flags]) == 2
    err = capsys.readouterr().err
    assert named.format(dir=tmp_path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_process_counts_in_a_config(tmp_path):
    for value in ("0", "-2", "many"):
        path = write(tmp_path / "c.yaml", f"distributed_type: MULTI_GPU\nnum_processes: {value}\n")
        with pytest.raises(ConfigError, match=r"c.yaml: num_processes: '.*' is not a number of processes"):
            read_accelerate_config(path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="about a machine without CUDA")
def test_cli_cuda_on_a_machine_without_it_names_the_flags(recipe_file, capsys):
    assert main(["estimate", recipe_file, "--device", "cuda", "--device-memory", "1GB"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: this machine has no CUDA device" in err and "--peak-tflops" in err
    assert "Traceback" not in err
