"""DeepSpeed ZeRO through Accelerate in two gloo CPU processes: the same numbers as one process,
under ZeRO-2 and ZeRO-3 (weights partitioned), LoRA and bfloat16, and checkpoints that resume
across ZeRO and one process both ways.

The processes are started by ``accelerate launch --use_deepspeed`` around tests/deepspeed_on_cpu.py,
which corrects Accelerate's count of processes on a machine without an accelerator (see there).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dpokit.config import ConfigError
from dpokit.train import train
from dpokit.zero import check_zero, configure, describe
from runs import LORA, accelerate_launch, read_rows, run_args, run_config, train_rows
from test_fsdp import COMPARED, assert_same_rows, assert_same_weights

pytest.importorskip("deepspeed")

EXAMPLE = Path(__file__).parents[1] / "examples" / "accelerate" / "zero3.json"


def zero3_config(workdir: Path) -> Path:
    """The example ZeRO-3 config with every weight partitioned: its "auto" persistence threshold
    (10 x hidden size) would keep the tiny model's small weights whole on every process."""
    config = json.loads(EXAMPLE.read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = workdir / "zero3.json"
    path.write_text(json.dumps(config))
    return path


def launch_zero(workdir: Path, out: str, *overrides: str, launch: tuple[str, ...] = ("--use_deepspeed", "--zero_stage=2")) -> str:
    """``dpokit train`` under DeepSpeed in 2 CPU processes with half the per-device batch of
    :func:`run_config`'s runs; returns the output, stdout then stderr (asserting success)."""
    result = accelerate_launch(str(Path(__file__).parent / "deepspeed_on_cpu.py"), "train",
                               *run_args(workdir, out, "per_device_train_batch_size=2", *overrides), launch=launch)
    return result.stdout + result.stderr


def test_zero2_matches_one_process_and_its_checkpoint_resumes_unsharded(workdir):
    """ZeRO-2 (launched with flags only) with gradient accumulation and the optimizer offloaded to the
    host (where Accelerate puts DeepSpeedCPUAdam in place of dpokit's AdamW, over the same groups:
    the schedule follows it) trains as one process does; its checkpoint holds the whole model and
    AdamW state keyed by name, and resumes in one process exactly as the uninterrupted run goes on."""
    one = train(run_config(workdir, "zero-one", "save_steps=2"))
    output = launch_zero(workdir, "zero2", "save_steps=2", "per_device_train_batch_size=1", "gradient_accumulation_steps=2",
                         launch=("--use_deepspeed", "--zero_stage=2", "--offload_optimizer_device=cpu"))
    assert "sharding: DeepSpeed ZeRO-2 over 2 processes: optimizer states and gradients partitioned; offloaded: optimizer" in output
    assert "lr_scheduler.step()` before `optimizer.step()" not in output  # the schedule is on the optimizer that steps
    two = workdir / "zero2"
    assert_same_rows(read_rows(one), read_rows(two), COMPARED + ("eval/loss", "eval/logps/chosen"))
    assert_same_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")
    saved = torch.load(two / "checkpoints" / "step-2" / "optimizer.pt", weights_only=False)
    state = saved["state"]["model.model.layers.0.self_attn.q_proj.weight"]
    assert state["exp_avg"].shape == (32, 32) and float(state["step"]) == 2
    assert state["step"] is not saved["state"]["model.model.norm.weight"]["step"]  # each counts its own steps
    assert [g["decayed"] for g in saved["param_groups"]] == [True, False]

    resumed = train(run_config(workdir, "zero2", f"resume_from_checkpoint={two / 'checkpoints' / 'step-2'}"))
    assert_same_rows(train_rows(one), train_rows(resumed))
    assert_same_weights(one / "final" / "model.safetensors", resumed / "final" / "model.safetensors")


def test_zero3_partitions_the_weights_and_resumes_an_unsharded_checkpoint(workdir, monkeypatch):
    """ZeRO-3 with every weight partitioned (each forward gathers them, so evaluation with unequal
    batch counts per process pads itself, and gradient checkpointing's recomputing forwards gather
    them again) trains as one process does. Resumed from one process's checkpoint: steps 3-4 as the
    uninterrupted run, and its own checkpoint at step 4 holds the same model. The resumed run's
    reference is the starting model loaded again, in an engine of its own, partitioned too; its
    log-probs are computed again there (an empty cache), and are the same."""
    lines = (workdir / "eval.jsonl").read_text().splitlines()[:9]  # 2 processes x batches of 2: 3 and 2 batches
    (workdir / "eval9.jsonl").write_text("\n".join(lines) + "\n")
    common = (f"data.eval={workdir / 'eval9.jsonl'}", "per_device_eval_batch_size=2", "eval_steps=2", "save_steps=2")
    one = train(run_config(workdir, "zero3-one", *common))
    output = launch_zero(workdir, "zero3", *common, "gradient_checkpointing=true",
                         launch=("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir))))
    # zero3_init_flag (Accelerate's default under ZeRO-3): the other process built the model empty, so
    # equal numbers show the main process's weights were broadcast into its partitions
    assert ("DeepSpeed ZeRO-3 over 2 processes: optimizer states, gradients and weights partitioned; weights read by "
            "the main process only, broadcast into the partitions") in output
    assert_same_rows(read_rows(one), read_rows(workdir / "zero3"), COMPARED + ("eval/loss", "eval/logps/chosen"))
    assert_same_weights(one / "final" / "model.safetensors", workdir / "zero3" / "final" / "model.safetensors")

    from_one = workdir / "zero3-from-one"  # a new run folder going on from the unsharded run's step 2
    monkeypatch.setenv("DPOKIT_CACHE", str(workdir / "empty-cache"))
    output = launch_zero(workdir, "zero3-from-one", *common, f"resume_from_checkpoint={one / 'checkpoints' / 'step-2'}",
                         launch=("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir))))
    assert "weights partitioned over 2 processes (ZeRO-3)" in output and "log-probs of 48 pairs computed" in output
    assert_same_rows(train_rows(one), train_rows(from_one))
    assert_same_weights(one / "checkpoints" / "step-4" / "model.safetensors", from_one / "checkpoints" / "step-4" / "model.safetensors")
    ours, theirs = (torch.load(d / "checkpoints" / "step-4" / "optimizer.pt", weights_only=False) for d in (from_one, one))
    names = ours["param_groups"][0]["params"] + ours["param_groups"][1]["params"]
    for position, name in enumerate(names):  # the unsharded run's state is keyed by position in the same order
        torch.testing.assert_close(ours["state"][name]["exp_avg"], theirs["state"][position]["exp_avg"], atol=1e-6, rtol=0)


def test_lora_under_zero3_trains_as_one_process(workdir):
    """LoRA's live reference (the policy with its adapters off) under ZeRO-3: the same adapter. Its
    checkpoint resumes in one process, whose optimizer has a group more (DeepSpeed leaves out the
    empty one of biases and norms, which LoRA does not train), exactly as the uninterrupted run."""
    lora = (*LORA, "precompute_ref_log_probs=false", "save_steps=2")
    one = train(run_config(workdir, "zero-lora-one", *lora))
    launch_zero(workdir, "zero-lora", *lora, launch=("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir))))
    assert_same_rows(read_rows(one), read_rows(workdir / "zero-lora"), COMPARED)
    a, b = load_file(one / "final" / "adapter_model.safetensors"), load_file(workdir / "zero-lora" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    resumed = train(run_config(workdir, "zero-lora", *lora, f"resume_from_checkpoint={workdir / 'zero-lora' / 'checkpoints' / 'step-2'}"))
    assert_same_rows(train_rows(one), train_rows(resumed))
    c = load_file(resumed / "final" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_bf16_is_deepspeeds_bfloat16_mode(workdir):
    """bf16: true trains DeepSpeed's bfloat16 copy over float32 masters: step 1's rewards are exactly 0
    (the reference was scored by the same bfloat16 weights: the policy's engine for the log-probs
    computed once, and a separate live reference's own engine, which casts it as the policy's does,
    whole under ZeRO-2 and partitioned under ZeRO-3, where dpokit casts both before partitioning),
    the numbers are close to autocast's in one process, and the final model is saved from the masters,
    in the dtype it was loaded in. ``dpokit eval`` launched as the run was gives its eval numbers."""
    one = train(run_config(workdir, "zero-bf16-one", "bf16=true"))
    separate = (f"model.ref_model_name_or_path={workdir / 'model'}", "precompute_ref_log_probs=false")
    zero3 = ("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir)))
    outputs = {}
    for out, overrides, launch in (("zero-bf16", (), ("--use_deepspeed", "--zero_stage=2")),
                                   ("zero-bf16-live", separate, ("--use_deepspeed", "--zero_stage=2")),
                                   ("zero3-bf16-live", separate, zero3)):
        outputs[out] = launch_zero(workdir, out, "bf16=true", *overrides, launch=launch)
        rows = train_rows(workdir / out)
        assert rows[0]["rewards/margins"] == 0.0 and rows[0]["rewards/chosen"] == 0.0
        assert_same_rows(train_rows(one), rows, ("loss", "rewards/margins"), tol=3e-3)
        final = load_file(workdir / out / "final" / "model.safetensors")
        assert {t.dtype for t in final.values()} == {torch.float32}
        assert_same_weights(one / "final" / "model.safetensors", workdir / out / "final" / "model.safetensors", atol=2e-2)
    assert ("reference sharding: a DeepSpeed engine without an optimizer, whole on each process (ZeRO-1/2 partition "
            "no weights), in bfloat16") in outputs["zero-bf16-live"]
    assert ("reference sharding: a DeepSpeed engine without an optimizer, weights partitioned over 2 processes (ZeRO-3), "
            "in bfloat16") in outputs["zero3-bf16-live"]

    # `dpokit eval` launched as the run was scores both models in engines of their own, as training
    # scored them: its numbers are the run's last eval row, exactly (in one process, autocast's differ)
    for out, launch in (("zero-bf16", ("--use_deepspeed", "--zero_stage=2")), ("zero3-bf16-live", zero3)):
        accelerate_launch(str(Path(__file__).parent / "deepspeed_on_cpu.py"), "eval", str(workdir / out),
                          "--output", str(workdir / out / "eval-again.json"), launch=launch)
        again = json.loads((workdir / out / "eval-again.json").read_text())["metrics"]
        last = read_rows(workdir / out)[-1]
        assert {k: again[k] for k in ("eval/loss", "eval/logps/chosen", "eval/rewards/margins")} == {
            k: last[k] for k in ("eval/loss", "eval/logps/chosen", "eval/rewards/margins")}


class Launched(SimpleNamespace):
    """What check_zero and configure read of an Accelerator launched under DeepSpeed."""

    def __init__(self, ds_config: dict, processes: int = 2, mixed_precision: str = "no"):
        from accelerate.utils import DistributedType

        super().__init__(distributed_type=DistributedType.DEEPSPEED, num_processes=processes, mixed_precision=mixed_precision,
                         state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)))


def test_what_deepspeed_cannot_do_here_is_refused_before_loading(workdir, monkeypatch):
    config = run_config(workdir, "refused")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json")
    check_zero(Launched({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": "auto", "bf16": {"enabled": False}}), config)
    check_zero(Launched({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0}), config)
    refused = {
        "ZeRO stage 0 is plain data parallelism": ({"zero_optimization": {"stage": 0}}, ()),
        "'optimizer' section": ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, ()),
        "'scheduler' section": ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, ()),
        "the DeepSpeed config ds.json sets gradient_accumulation_steps to 4, but this run's dpokit config makes it 1": (
            {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}, ()),
        "sets bf16.enabled to True": ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, ()),
        "fp16": ({"zero_optimization": {"stage": 2}}, ("fp16=true",)),
        "torch_compile under ZeRO-3": ({"zero_optimization": {"stage": 3}}, ("torch_compile=true",)),
        "optim=adamw_8bit": ({"zero_optimization": {"stage": 1}}, ("optim=adamw_8bit",)),
    }
    for message, (ds, overrides) in refused.items():
        with pytest.raises(ConfigError, match=message):
            check_zero(Launched(ds), run_config(workdir, "refused", *overrides))
    with pytest.raises(ConfigError, match="--mixed_precision no"):
        check_zero(Launched({"zero_optimization": {"stage": 2}}, mixed_precision="fp16"), config)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")  # flags only: Accelerate's defaults, replaced by dpokit's
    check_zero(Launched({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}), config)


def test_configure_writes_dpokits_settings_and_the_auto_sizes():
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 100,
                                "stage3_param_persistence_threshold": "auto", "offload_optimizer": {"device": "cpu"}},
          "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}
    launched = Launched(ds, processes=4)
    config = run_config(Path("/nowhere"), "x", "per_device_train_batch_size=2", "gradient_accumulation_steps=3", "bf16=true",
                        "max_grad_norm=0.5")
    configure(launched, config, hidden_size=64)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (4096, 100, 640)
    assert describe(launched) == ("DeepSpeed ZeRO-3 over 4 processes: optimizer states, gradients and weights partitioned; "
                                  "offloaded: optimizer")


def test_tr_dpo_moves_a_live_reference_under_zero1(workdir):
    """A separate live reference (a whole copy on each process under ZeRO-1/2) that TR-DPO moves toward
    the policy: the same rows as one process, and the checkpoint's moved reference is the same model."""
    options = ("precompute_ref_log_probs=false", "sync_ref_model=true", "ref_model_sync_steps=2", "ref_model_mixup_alpha=0.5",
               "save_steps=4")
    one = train(run_config(workdir, "zero-trdpo-one", *options))
    output = launch_zero(workdir, "zero-trdpo", *options, launch=("--use_deepspeed", "--zero_stage=1"))
    assert "sharding: DeepSpeed ZeRO-1 over 2 processes: optimizer states partitioned" in output
    assert_same_rows(read_rows(one), read_rows(workdir / "zero-trdpo"), COMPARED + ("eval/loss",))
    moved = Path("checkpoints") / "step-4" / "reference" / "model.safetensors"
    assert_same_weights(one / moved, workdir / "zero-trdpo" / moved)


def test_tr_dpo_moves_a_partitioned_reference_under_zero3(workdir):
    """Under ZeRO-3 a separate live reference is partitioned like the policy (an engine of its own),
    and TR-DPO moves each process's slices, and the small weights the example config keeps whole on
    every process, without communication. Resumed from one process's checkpoint (its moved reference
    read into the engine, by every process: zero3_init_flag false), steps 3-4 are that run's, and so is
    the reference saved at step 4."""
    options = ("precompute_ref_log_probs=false", "sync_ref_model=true", "ref_model_sync_steps=1", "ref_model_mixup_alpha=0.5",
               "save_steps=2")
    one = train(run_config(workdir, "zero3-trdpo-one", *options))
    output = launch_zero(workdir, "zero3-trdpo", *options, f"resume_from_checkpoint={one / 'checkpoints' / 'step-2'}",
                         launch=("--use_deepspeed", "--deepspeed_config_file", str(EXAMPLE), "--zero3_init_flag=false"))
    assert "reference sharding: a DeepSpeed engine without an optimizer, weights partitioned over 2 processes (ZeRO-3)" in output
    assert "weights read by the main process only" not in output  # each process read them (zero3_init_flag false)
    assert_same_rows(train_rows(one), train_rows(workdir / "zero3-trdpo"))
    moved = Path("checkpoints") / "step-4" / "reference" / "model.safetensors"
    assert_same_weights(one / moved, workdir / "zero3-trdpo" / moved)


def test_lora_in_bf16_resumes_exactly(workdir):
    """A LoRA run in DeepSpeed's bfloat16 mode under ZeRO-3, resumed from its step-2 checkpoint, goes
    on exactly as the uninterrupted run: the float32 master adapters are the checkpoint's (saved from
    the masters), not the engine's bfloat16 copy of them."""
    lora = (*LORA, "bf16=true", "save_steps=2")
    zero3 = ("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir)))
    launch_zero(workdir, "zero-lora-bf16", *lora, launch=zero3)
    first = workdir / "zero-lora-bf16"
    launch_zero(workdir, "zero-lora-bf16-resumed", *lora, f"resume_from_checkpoint={first / 'checkpoints' / 'step-2'}", launch=zero3)
    assert_same_rows(train_rows(first), train_rows(workdir / "zero-lora-bf16-resumed"), tol=0)
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (first, workdir / "zero-lora-bf16-resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
