"""TR-DPO (``training.sync_ref_model``): the live reference moves toward the policy every N steps,
reference = α·policy + (1-α)·reference, and a resumed run goes on with the reference it had."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.config import ConfigError
from dpokit.logps import ReplyLogProbs
from dpokit.reference import sync_reference
from runs import LORA, read_rows, run_config, train_rows
from test_logps import tiny_lm

SYNC = ("sync_ref_model=true", "precompute_ref_log_probs=false")
NO_EVAL = "eval=null"


def test_the_reference_moves_by_alpha_toward_the_policy_weight_by_weight():
    """Paired by name, also where the policy's layers are wrapped for activation checkpointing (as
    Accelerate's FSDP2 wraps them)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    policy, reference = ReplyLogProbs(tiny_lm(seed=1)), ReplyLogProbs(tiny_lm(seed=2))
    reference.requires_grad_(False)
    layers = policy.model.model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    assert any("_checkpoint_wrapped_module" in name for name, _ in policy.named_parameters())
    before = {name: p.clone() for name, p in reference.named_parameters()}
    targets = {name.replace("_checkpoint_wrapped_module.", ""): p for name, p in policy.named_parameters()}
    sync_reference(reference, policy, 0.25)
    for name, weight in reference.named_parameters():
        torch.testing.assert_close(weight, 0.25 * targets[name] + 0.75 * before[name], atol=1e-7, rtol=0)
    assert not any(p.requires_grad for p in reference.parameters())  # still frozen: nothing trains it


def test_a_reference_synced_whole_every_step_gives_zero_rewards_at_every_step(workdir):
    """α = 1 every step: each step's reference is the policy as the step finds it, so every step's
    rewards are exactly 0 and its loss log 2, while the policy trains. Without it, rewards move."""
    rows = train_rows(train_run(workdir, "sync-whole", NO_EVAL, *SYNC, "ref_model_mixup_alpha=1.0", "ref_model_sync_steps=1"))
    assert len(rows) == 4
    for row in rows:
        assert row["rewards/chosen"] == 0.0 and row["rewards/rejected"] == 0.0
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
    frozen = train_rows(train_run(workdir, "sync-none", NO_EVAL, "precompute_ref_log_probs=false"))
    assert frozen[-1]["rewards/chosen"] != 0.0


def train_run(workdir, out: str, *overrides: str):
    from dpokit.train import train

    return train(run_config(workdir, out, *overrides))


def test_a_resumed_run_goes_on_with_the_reference_it_had_moved(workdir):
    """Checkpoints hold the moved reference: a run resumed from step 2 logs the uninterrupted run's
    steps 3-4 (with the starting reference instead, its rewards would differ). A checkpoint of a run
    without sync_ref_model holds none, and is refused for one with it."""
    common = (NO_EVAL, *SYNC, "ref_model_mixup_alpha=0.6", "ref_model_sync_steps=1", "save_steps=2")
    out = train_run(workdir, "sync-whole-run", *common)
    whole = train_rows(out)
    assert (out / "checkpoints" / "step-2" / "reference" / "model.safetensors").is_file()
    resumed = train_run(workdir, "sync-resumed", *common, f"resume_from_checkpoint={out / 'checkpoints' / 'step-2'}")
    assert [r["step"] for r in read_rows(resumed) if "loss" in r] == [1, 2, 3, 4]  # steps 1-2 carried from the first run
    for a, b in zip(whole, train_rows(resumed), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)

    plain = train_run(workdir, "sync-from-plain", NO_EVAL, "precompute_ref_log_probs=false", "save_steps=2", "max_steps=2")
    with pytest.raises(ConfigError, match=r"holds none .*reference is missing\): it was saved by a run without sync_ref_model"):
        train_run(workdir, "sync-from-plain", *common, f"resume_from_checkpoint={plain / 'checkpoints' / 'step-2'}")


def test_sync_ref_model_is_refused_without_a_live_reference_of_its_own(workdir):
    refused = {
        ("sync_ref_model=true",): "scored once before training: set precompute_ref_log_probs=false",
        (*SYNC, *LORA): "no weights of its own: train without LoRA",
        ("sync_ref_model=true", "loss_type=[simpo]"): r"loss_type \['simpo'\] has no loss with a reference",
        (*SYNC, "ref_model_mixup_alpha=0"): r"ref_model_mixup_alpha must be in \(0, 1\], got 0",
        (*SYNC, "ref_model_sync_steps=0"): "ref_model_sync_steps must be at least 1, got 0",
        ("ref_model_sync_steps=8",): "ref_model_sync_steps=8 is TR-DPO's, but sync_ref_model is false",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            run_config(workdir, "refused", *overrides)


def test_a_checkpoints_reference_is_a_model_folder_dpokit_eval_takes(workdir):
    """The last eval row scored against the moved reference; dpokit eval of the final model against
    the last checkpoint's reference (synced at that same step) gives the same numbers."""
    from dpokit.evaluate import evaluate_model

    out = train_run(workdir, "sync-eval", *SYNC, "ref_model_sync_steps=2", "save_steps=4")
    last = [r for r in read_rows(out) if "eval/loss" in r][-1]
    report, _ = evaluate_model(str(out), reference=str(out / "checkpoints" / "step-4" / "reference"), log=lambda line: None)
    for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"):
        assert report.metrics[key] == pytest.approx(last[key], rel=1e-5, abs=1e-7), key
