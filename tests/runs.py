"""Shared pieces of the end-to-end tests: a tiny model + data folder, configs, metrics rows."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import transformers

from dpokit.config import load_config
from dpokit.quickstart_data import generate_pairs
from dpokit.tiny import build_tiny_model

TRANSFORMERS_4 = transformers.__version__.startswith("4.")
"""Whether the installed transformers is a 4.x release, whose models differ from 5.x's in places."""

METRIC_KEYS = {
    "step", "epoch", "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
    "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "logits/chosen",
    "logits/rejected", "mean_token_accuracy", "tokens",
    "tokens_per_second", "pairs", "pairs_per_second", "seconds",
}


def make_workdir(root: Path, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    """A tiny Qwen2 model (2 layers, hidden 32 unless asked) and 48 train / 12 eval quickstart pairs under ``root``."""
    build_tiny_model(root / "model", hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=intermediate_size, seed=0)
    for name, n, seed in (("train", 48, 1), ("eval", 12, 2)):
        with open(root / f"{name}.jsonl", "w") as f:
            for row in generate_pairs(n, seed):
                f.write(json.dumps(row) + "\n")
    return root


def run_args(workdir: Path, out: str, *overrides: str) -> list[str]:
    """The overrides of a short run on the tiny model (``dpokit train`` arguments without a config file).
    No plots unless asked (``plots=true``): drawing them costs more than such a run's training. A run
    that does not resume replaces what an earlier test left in its ``out`` (``overwrite_output_dir``)."""
    resumes = any(o.startswith("resume_from_checkpoint=") for o in overrides)
    return [
        f"model.name_or_path={workdir / 'model'}", f"data.train={workdir / 'train.jsonl'}",
        f"data.eval={workdir / 'eval.jsonl'}", f"output_dir={workdir / out}", "max_length=128",
        "learning_rate=1e-3", "max_steps=4", "per_device_train_batch_size=4", "per_device_eval_batch_size=8",
        "logging_steps=1", "seed=3", "progress_bar=false", "save_steps=null", "plots=false",
        *([] if resumes else ["overwrite_output_dir=true"]), *overrides,
    ]


def run_config(workdir: Path, out: str, *overrides: str):
    return load_config(None, run_args(workdir, out, *overrides))


LORA = ("use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0.0", "lora_target_modules=[q_proj,v_proj]")
"""Overrides for a small LoRA run on the tiny model."""


def accelerate_launch(*command: str, launch: tuple[str, ...] = ("--multi_gpu",), processes: int = 2,
                      timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``command`` (``-m dpokit train ...``, or a script and its arguments) in
    ``processes`` processes on a free port, with this checkout's ``src`` and ``tests`` importable;
    asserts that it succeeded. ``launch``: how the processes are asked for (``--multi_gpu`` starts
    several even without GPUs: gloo CPU processes); ``check=False`` returns a failed launch too.
    A launch still running after ``timeout`` seconds fails with every process's Python stack (where it hung)."""
    root = Path(__file__).parents[1]
    paths = [str(root / "src"), str(root / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep the caller's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths), "PYTHONFAULTHANDLER": "1"}
    env.pop("FSDP_AUTO_WRAP_POLICY", None)  # dpokit's default (a unit per layer) unless a test sets one
    port = free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, f"--num_processes={processes}", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}", *command]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as launch_process:
        try:
            stdout, stderr = launch_process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in _descendants(launch_process.pid):  # the workers: faulthandler prints each one's stack
                os.kill(pid, signal.SIGABRT)
            try:
                stdout, stderr = launch_process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(launch_process.pid, signal.SIGKILL)
                stdout, stderr = launch_process.communicate()
            raise AssertionError(f"still running after {timeout}s; the stacks:\n{stderr[-12000:]}") from None
    result = subprocess.CompletedProcess(cmd, launch_process.returncode, stdout, stderr)
    assert result.returncode == 0 or not check, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, by its children, and so on (from /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            pass
    return [p for child in children for p in (child, *_descendants(child))]


def summary_items(printed: str) -> dict[str, str]:
    """The items of the last run summary in ``printed`` (what ``dpokit train`` or ``dpokit report`` printed)."""
    body = printed.rsplit("dpokit run summary", 1)[1].splitlines()[1:]
    items = (line.strip().split("  ", 1) for line in body if line.startswith("  "))
    return {key: value.strip() for key, value in items}


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(run_dir: Path) -> list[dict]:
    """The training rows of a run's metrics (eval rows left out)."""
    return [r for r in read_rows(run_dir) if "loss" in r]


def sft_adapter(workdir: Path, folder: Path) -> Path:
    """An adapter with non-zero weights, as an SFT run would leave."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(workdir / "model"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder
