"""Sharded training (FSDP2 through Accelerate) in two gloo CPU processes: the same numbers as one
process, checkpoints that hold the whole model, and resume across sharded and unsharded runs.

The processes are started by ``accelerate launch --use_fsdp --fsdp_version 2`` around
tests/fsdp_on_cpu.py, which lifts Accelerate's accelerator-only gate for FSDP (see there).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import ConfigError
from dpokit.sharding import check_sharding, named_state, positional_state
from dpokit.train import starting_reference, train
from fsdp_on_cpu import broadcasts_through_cuda
from runs import LORA, accelerate_launch, free_port, read_rows, run_args, run_config, train_rows

accelerate = pytest.importorskip("accelerate")
HAS_FSDP2 = hasattr(accelerate.Accelerator, "is_fsdp2")
# torch 2.6's FSDP2 records events on its collectives' streams, which only torch 2.7+ CPU streams can
# (GPU runs are unaffected; Accelerate itself shards on accelerators only, see tests/fsdp_on_cpu.py)
CPU_STREAMS_RECORD = hasattr(torch.cpu.Stream, "record_event")
needs_fsdp2 = pytest.mark.skipif(
    not (HAS_FSDP2 and CPU_STREAMS_RECORD),
    reason="Accelerate before 1.6 has no FSDP2" if not HAS_FSDP2 else "FSDP2 in CPU processes needs torch 2.7+",
)

BROADCASTS_THROUGH_CUDA = HAS_FSDP2 and broadcasts_through_cuda()
"""Accelerate 1.6 broadcasts the main process's weights into the shards through CUDA only: on a CPU
every process reads them (tests/fsdp_on_cpu.py)."""

COMPARED = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


EXAMPLE_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate" / "fsdp2.yaml"


def launch_fsdp(workdir: Path, out: str, *overrides: str, launch: tuple[str, ...] = ("--use_fsdp", "--fsdp_version=2")) -> str:
    """``dpokit train`` under FSDP2 in 2 CPU processes with half the per-device batch of :func:`run_config`'s
    runs; returns the output (asserting success). ``launch``: how FSDP2 is asked for."""
    return accelerate_launch(str(Path(__file__).parent / "fsdp_on_cpu.py"), "train",
                             *run_args(workdir, out, "per_device_train_batch_size=2", *overrides), launch=launch).stdout


def assert_same_rows(a: list[dict], b: list[dict], keys=COMPARED, tol=1e-4) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=tol), (ra["step"], key)


def assert_same_weights(a: Path, b: Path, atol: float = 1e-4) -> None:
    """Adam divides by sqrt(v), so round-off in tiny gradients shows: agree to a tenth of one step (lr 1e-3)."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def uneven_eval(workdir):
    """9 eval pairs: with 2 processes and batches of 2, one process has 3 batches, the other 2."""
    lines = (workdir / "eval.jsonl").read_text().splitlines()[:9]
    path = workdir / "eval9.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return f"data.eval={path}"


@needs_fsdp2
def test_sharded_run_matches_one_process_and_resumes(workdir, uneven_eval):
    """FSDP2 over 2 processes trains exactly as 1 process (tied embedding and output layer, the
    reference precomputed, evaluation with unequal batch counts per process), its checkpoints and
    final folder hold the whole model, and a sharded checkpoint resumes sharded and unsharded."""
    common = (uneven_eval, "per_device_eval_batch_size=2", "eval_steps=2", "save_steps=2")
    one = train(run_config(workdir, "fsdp-one", *common))
    output = launch_fsdp(workdir, "fsdp-two", *common,  # every process reads the weights (Accelerate's default: the main one)
                         launch=("--use_fsdp", "--fsdp_version=2", "--fsdp_cpu_ram_efficient_loading=false"))
    assert "sharding: FSDP2 over 2 processes: 3 units (2 Qwen2DecoderLayer, root)" in output
    assert "process 0 read the model weights" in output and "process 1 read the model weights" in output  # each its own
    two = workdir / "fsdp-two"
    assert_same_rows(read_rows(one), read_rows(two), COMPARED + ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"))
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")
    assert_same_weights(one / "checkpoints" / "step-2" / "model.safetensors", two / "checkpoints" / "step-2" / "model.safetensors")
    saved = torch.load(two / "checkpoints" / "step-2" / "optimizer.pt", weights_only=False)
    assert "model.model.layers.0.self_attn.q_proj.weight" in saved["state"]  # whole, keyed by name
    assert saved["state"]["model.model.layers.0.self_attn.q_proj.weight"]["exp_avg"].shape == (32, 32)

    # the sharded checkpoint resumed in one process, and sharded again: steps 3-4 as uninterrupted
    step2 = f"resume_from_checkpoint={two / 'checkpoints' / 'step-2'}"
    resumed = train(run_config(workdir, "fsdp-two", "save_steps=null", uneven_eval, "per_device_eval_batch_size=2", step2))
    assert_same_rows(train_rows(one), train_rows(resumed))
    launch_fsdp(workdir, "fsdp-two", uneven_eval, "per_device_eval_batch_size=2", step2)
    assert_same_rows(train_rows(one), train_rows(two))
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


@needs_fsdp2
def test_unsharded_checkpoint_resumes_sharded(workdir):
    """Launched with examples/accelerate/fsdp2.yaml and Accelerate's own activation checkpointing
    (which wraps each layer, and so renames its parameters), with gradient accumulation (the same
    global batch: 1 pair x 2 micro-steps x 2 processes)."""
    one = train(run_config(workdir, "fsdp-from-one", "save_steps=2"))
    output = launch_fsdp(workdir, "fsdp-from-one", f"resume_from_checkpoint={one / 'checkpoints' / 'step-2'}",
                         "per_device_train_batch_size=1", "gradient_accumulation_steps=2",
                         launch=("--config_file", str(EXAMPLE_CONFIG), "--fsdp_activation_checkpointing=true"))
    assert "sharding: FSDP2 over 2 processes" in output and "; activation checkpointing: 2 Qwen2DecoderLayer" in output
    if not BROADCASTS_THROUGH_CUDA:  # the example's cpu_ram_efficient_loading: only the main process reads the weights
        assert "weights read by the main process only, broadcast into the shards" in output
        assert "process 0 read the model weights" in output and "process 1 read" not in output
    uninterrupted = train(run_config(workdir, "fsdp-from-one-ref"))
    assert_same_rows(train_rows(uninterrupted), train_rows(one))
    assert_same_weights(uninterrupted / "final" / "model.safetensors", one / "final" / "model.safetensors")


@needs_fsdp2
@pytest.mark.parametrize("kind", ["lora-fp16", "full-bf16"])
def test_sharded_16bit_live_reference(workdir, kind):
    """16-bit FSDP2 (its mixed-precision policy: weights gathered in 16 bits, gradients reduced in
    float32) with a live reference, with gradient checkpointing. LoRA's reference is the sharded
    policy with its adapters off (float16 with loss scaling; the final folder is the adapter); full
    training's is a frozen copy, sharded alike (bfloat16); only the main process reads the weights
    (Accelerate's cpu_ram_efficient_loading), the frozen copy's included. The reference scores as the policy does
    (rewards exactly 0 before the first update); the run follows one process's autocast run as
    closely as 16-bit rounding allows."""
    lora = kind.startswith("lora")
    options = (*(LORA if lora else ()), "precompute_ref_log_probs=false", "gradient_checkpointing=true",
               *(("fp16=true",) if lora else ("bf16=true",)))
    one = train(run_config(workdir, f"fsdp-live-{kind}-one", *options))
    output = launch_fsdp(workdir, f"fsdp-live-{kind}-two", *options,
                         launch=("--use_fsdp", "--fsdp_version=2", "--fsdp_cpu_ram_efficient_loading=true"))
    two = workdir / f"fsdp-live-{kind}-two"
    if not lora:
        assert "reference sharding: FSDP2 over 2 processes: 3 units (2 Qwen2DecoderLayer, root)" in output
    # only the main process reads the weights, of the frozen copy too, whose shards it broadcasts as the policy's
    assert ("process 1 read" not in output) == (not BROADCASTS_THROUGH_CUDA)
    a, b = train_rows(one), train_rows(two)
    assert b[0]["rewards/chosen"] == 0 and b[0]["rewards/rejected"] == 0 and b[0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=2e-3), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=0.1), ra["step"]
        assert rb["logps/chosen"] == pytest.approx(ra["logps/chosen"], rel=1e-3), ra["step"]
    # what was saved is what was trained: one process scoring final/ gives the run's last eval
    from dpokit.cli import main

    main(["eval", str(two)])
    metrics = json.loads((two / "eval.json").read_text())["metrics"]
    last_eval = [r for r in read_rows(two) if "eval/loss" in r][-1]
    for key in ("eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins"):
        assert metrics[key] == pytest.approx(last_eval[key], rel=1e-3, abs=1e-3), key
    # `dpokit eval` launched as the run was shards both models as training did (the same units and
    # 16-bit mixed-precision policy, weights read by the main process only): its numbers are the run's
    # last eval row, exactly (in one process, autocast's differ)
    output = accelerate_launch(str(Path(__file__).parent / "fsdp_on_cpu.py"), "eval", str(two), "--output",
                               str(two / "eval-two.json"),
                               launch=("--use_fsdp", "--fsdp_version=2", "--fsdp_cpu_ram_efficient_loading=true")).stdout
    assert ("process 1 read" not in output) == (not BROADCASTS_THROUGH_CUDA)
    launched = json.loads((two / "eval-two.json").read_text())["metrics"]
    keys = ("eval/loss", "eval/logps/chosen", "eval/logps/rejected", "eval/rewards/margins")
    assert {k: launched[k] for k in keys} == {k: last_eval[k] for k in keys}


@needs_fsdp2
@pytest.mark.parametrize("option", ["torch_compile=true", "attn_implementation=dpokit_varlen"])
def test_sharded_run_matches_one_process_compiled_and_under_varlen(workdir, option):
    """torch_compile (the sharded decoder's layers compiled in place) and dpokit_varlen (rows regrouped on the
    host with each batch; on a CPU its exact per-sequence loop) train under FSDP2 as one process
    trains with neither (float32: the same numbers to 1e-4). Compiled and sharded, the reference pass
    and the first training forward differ in the last bit of a log-prob (a reward of 7.6e-7 seen at
    step 1, where it is exactly 0 unsharded), which the 0/1 per-pair accuracy turns into 0.25: the
    compiled run's accuracies are left out of the comparison."""
    name = option.split("=")[0]
    one = train(run_config(workdir, "fsdp-plain-one", "max_steps=3", "eval=null"))
    launch_fsdp(workdir, f"fsdp-{name}-two", option, "max_steps=3", "eval=null")
    two = workdir / f"fsdp-{name}-two"
    compiled = name == "torch_compile"
    assert_same_rows(read_rows(one), read_rows(two), tuple(k for k in COMPARED if not (compiled and k == "rewards/accuracies")))
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


def test_every_process_reads_the_weights_it_loads(workdir, monkeypatch):
    """Launched with Accelerate's FSDP ``cpu_ram_efficient_loading``, transformers 4.x read the
    weights on each machine's first process only, leaving the others' models uninitialized:
    ``dpokit eval`` launched so scored garbage on them (its check of the model refused it). Here
    one gloo process posing as a machine's second (LOCAL_RANK=1) loads the model as dpokit does."""
    import torch.distributed as dist

    from dpokit.config import ModelConfig
    from dpokit.modeling import load_causal_lm

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "ACCELERATE_USE_FSDP": "true",
                       "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = load_causal_lm(ModelConfig(name_or_path=str(workdir / "model")))
    finally:
        dist.destroy_process_group()
    saved = load_file(workdir / "model" / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in saved.items())
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"  # the launch's setting, restored


def test_a_model_built_empty_holds_no_weights_in_memory(workdir, tmp_path):
    """What the processes other than the main one build when the main process's weights are broadcast
    into the shards (dpokit.modeling.empty_causal_lm): the architecture from config.json, its
    parameters uninitialised host memory that is never written, so the process does not grow by the
    model (a 127M-parameter model, 485 MiB in float32, here); tied weights one parameter; the
    buffers no state dict carries (rotary frequencies) as loading computes them, float32 beside
    16-bit parameters."""
    import os

    from transformers import Qwen2Config

    from dpokit.modeling import empty_causal_lm, load_causal_lm

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    big = tmp_path / "big"
    Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, tie_word_embeddings=True).save_pretrained(big)
    before = resident_mib()
    model = empty_causal_lm(str(big), revision=None, dtype=torch.float32, trust_remote_code=False)
    grown = resident_mib() - before
    assert sum(p.numel() for p in model.parameters()) > 120e6 and not any(p.is_meta for p in model.parameters())
    assert grown < 100, f"building it empty grew the process by {grown:.0f} MiB"
    model.get_input_embeddings().weight.data.fill_(1.0)  # 125 MiB written: now resident (the measure sees it)
    assert resident_mib() - before > grown + 100
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    config = run_config(workdir, "empty", "dtype=bfloat16").model
    loaded, empty = load_causal_lm(config), load_causal_lm(config, empty=True)
    assert [(n, p.shape, p.dtype) for n, p in empty.named_parameters()] == [(n, p.shape, p.dtype) for n, p in loaded.named_parameters()]
    assert empty.get_output_embeddings().weight is empty.get_input_embeddings().weight
    buffers = dict(loaded.named_buffers())
    for name, buffer in empty.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name


def test_optimizer_state_by_name_and_by_position_round_trip():
    names = ["a.weight", "b.weight", "a.bias"]
    state = {
        "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.ones(2)}, 2: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(1)}},
        "param_groups": [{"lr": 1e-3, "weight_decay": 0.1, "params": [0, 1]}, {"lr": 1e-3, "weight_decay": 0.0, "params": [2]}],
    }
    named = named_state(state, names)
    assert set(named["state"]) == {"a.weight", "a.bias"}
    assert named["param_groups"][0]["params"] == ["a.weight", "b.weight"] and named["param_groups"][0]["weight_decay"] == 0.1
    back = positional_state(named, names)
    assert back["param_groups"] == state["param_groups"]
    assert back["state"].keys() == state["state"].keys() and torch.equal(back["state"][0]["exp_avg"], torch.ones(2))


def test_what_is_not_supported_sharded_is_refused_before_loading(workdir):
    from accelerate.utils import DistributedType

    class Launched:
        def __init__(self, distributed_type, is_fsdp2=True, mixed_precision="no"):
            self.distributed_type, self.is_fsdp2, self.mixed_precision = distributed_type, is_fsdp2, mixed_precision

    config = run_config(workdir, "refused")
    check_sharding(Launched(DistributedType.FSDP), config)
    check_sharding(Launched(DistributedType.MULTI_GPU), run_config(workdir, "refused", "optim=adamw_8bit"))
    with pytest.raises(ConfigError, match="--fsdp_version 2"):
        check_sharding(Launched(DistributedType.FSDP, is_fsdp2=False), config)
    check_sharding(Launched(DistributedType.DEEPSPEED), config)  # dpokit.zero checks DeepSpeed's (tests/test_deepspeed.py)
    with pytest.raises(ConfigError, match="--mixed_precision no"):
        check_sharding(Launched(DistributedType.FSDP, mixed_precision="bf16"), config)
    for options in (("use_peft=true", "load_in_4bit=true"), ("optim=adamw_8bit",)):
        with pytest.raises(ConfigError, match="not supported under FSDP2"):
            check_sharding(Launched(DistributedType.FSDP), run_config(workdir, "refused", *options))


@pytest.mark.parametrize("flag, variable", [("--use_fsdp", "ACCELERATE_USE_FSDP"), ("--use_deepspeed", "ACCELERATE_USE_DEEPSPEED")])
def test_sharding_flags_on_cpu_processes_say_they_are_not_sharded(workdir, monkeypatch, flag, variable):
    """Accelerate shards only on accelerator devices: `accelerate launch --use_fsdp` (or
    `--use_deepspeed`) on a CPU machine runs the processes data parallel, which dpokit says rather
    than leave the user believing in shards."""
    from accelerate.utils import DistributedType

    from dpokit.sharding import setup

    printed = []

    class Launched:
        distributed_type, is_fsdp2, mixed_precision = DistributedType.MULTI_CPU, False, "no"

        def print(self, line):
            printed.append(line)

    config = run_config(workdir, "cpu-fsdp")
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert setup(Launched(), config, None) is False and printed == []
    monkeypatch.setenv(variable, "true")
    assert setup(Launched(), config, None) is False
    assert printed == [f"note: launched with {flag}, but Accelerate shards only on accelerator devices (GPUs): "
                       "these CPU processes train data parallel, each holding the whole model"]

    class Alone(Launched):
        distributed_type = DistributedType.NO

    printed.clear()
    assert setup(Alone(), config, None) is False and printed == []  # one process: no processes to say that of


def test_sharded_models_are_checked_on_the_host_and_never_placed_whole(workdir):
    """Under FSDP2 the model's one-time checks run on the host and sharding moves each process's
    share to its GPU: the whole model never sits on one GPU (so it need not fit one). Unsharded, or
    with an attention that has no CPU path, the model goes to the device first; under FSDP2 it then
    goes back to the host for sharding. (The device here is ``meta``: the model's moves are recorded.)"""
    from accelerate.utils import DistributedType

    from dpokit.train import placed_for_checks

    class Launched:
        def __init__(self, distributed_type):
            self.distributed_type, self.device = distributed_type, torch.device("meta")

    class Recorded(torch.nn.Linear):
        def to(self, device):
            self.moves.append(str(device))
            return self

    for kind, attn, moves in ((DistributedType.FSDP, "sdpa", []), (DistributedType.FSDP, "dpokit_varlen", []),
                              (DistributedType.FSDP, "flex_attention", ["meta", "cpu"]),
                              (DistributedType.MULTI_GPU, "sdpa", ["meta"]), (DistributedType.NO, "sdpa", ["meta"])):
        model = Recorded(2, 2)
        model.moves = []
        with placed_for_checks(model, run_config(workdir, "placed", f"attn_implementation={attn}"), Launched(kind)) as placed:
            assert placed is model and model.moves == moves[:1], (kind, attn)
        assert model.moves == moves, (kind, attn)


def test_reference_tables_of_sharded_16bit_runs_are_cached_apart(workdir):
    """FSDP2's 16-bit policy scores a little differently from autocast: its tables get their own key
    (float32 runs score alike and share theirs)."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(workdir / "model")
    bf16, fp32 = run_config(workdir, "key", "bf16=true"), run_config(workdir, "key")
    assert starting_reference(bf16, policy, False, sharded=True).fingerprint != starting_reference(bf16, policy, False).fingerprint
    assert starting_reference(fp32, policy, False, sharded=True).fingerprint == starting_reference(fp32, policy, False).fingerprint


@needs_fsdp2
def test_sharded_run_with_trls_other_loss_settings_matches_one_process(workdir):
    """LD-DPO (its reference table of weighted sums scored sharded), WPO's weights and an f-divergence
    together train under FSDP2 as in one process."""
    settings = ("ld_alpha=0.5", "use_weighting=true", "f_divergence_type=js_divergence", "max_steps=3", "eval_steps=3")
    one = train(run_config(workdir, "fsdp-losses-one", *settings))
    launch_fsdp(workdir, "fsdp-losses-two", *settings)
    two = workdir / "fsdp-losses-two"
    assert_same_rows(read_rows(one), read_rows(two), COMPARED + ("wpo/weight", "eval/loss", "eval/wpo/weight"))
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


@needs_fsdp2
def test_sharded_mixture_of_experts_adds_its_load_balancing_loss_as_one_process(workdir, tmp_path):
    """A Qwen2-MoE model with router_aux_loss_coef trains under FSDP2 (its layers with their experts
    as units) as one process trains the same micro-batches (2 pairs, accumulated twice): the same
    loss, aux_loss and weights. The load-balancing loss is a micro-batch's (a product of two means
    over its tokens), so one micro-batch of 4 pairs would give another number."""
    from test_architectures import save_tiny_model

    model = f"model.name_or_path={save_tiny_model('qwen2_moe', workdir, tmp_path)}"
    settings = (model, "router_aux_loss_coef=0.5", "max_steps=3", "eval=null")
    one = train(run_config(workdir, "fsdp-moe-one", *settings, "per_device_train_batch_size=2", "gradient_accumulation_steps=2"))
    launch_fsdp(workdir, "fsdp-moe-two", *settings)
    two = workdir / "fsdp-moe-two"
    assert_same_rows(read_rows(one), read_rows(two), COMPARED + ("aux_loss",))
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


@needs_fsdp2
def test_sharded_reference_moves_toward_the_policy_as_in_one_process(workdir):
    """TR-DPO under FSDP2: the reference, sharded like the policy, moves shard by shard; the run
    matches one process, and its checkpoint's reference is whole."""
    settings = ("sync_ref_model=true", "precompute_ref_log_probs=false", "ref_model_sync_steps=1", "max_steps=3",
                "eval_steps=3", "save_steps=3")
    one = train(run_config(workdir, "fsdp-sync-one", *settings))
    launch_fsdp(workdir, "fsdp-sync-two", *settings)
    two = workdir / "fsdp-sync-two"
    assert_same_rows(read_rows(one), read_rows(two), COMPARED + ("eval/loss", "eval/rewards/margins"))
    assert_same_weights(one / "checkpoints" / "step-3" / "reference" / "model.safetensors",
                        two / "checkpoints" / "step-3" / "reference" / "model.safetensors")
