"""``dpokit`` under Accelerate's DeepSpeed in gloo CPU processes, for the tests.

Launched with ``--use_deepspeed``, Accelerate sets the run up for DeepSpeed even without an
accelerator device: DeepSpeed starts the process group (its CPU accelerator, gloo), and every
prepared model is a ZeRO engine over all the processes. But Accelerate's own count of them stays
at one process, rank 0 (it reads the group only for accelerator devices), so each process would
train on every pair and log as the main one. This launcher corrects that one count from the process
group after Accelerate has set up, and runs the dpokit command line: everything after is the real
path, ZeRO's partitioned optimizer states, gradients and (stage 3) weights, with gloo collectives.

    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 tests/deepspeed_on_cpu.py train cfg.yaml ...
"""

import sys

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = accelerate.Accelerator.__init__


def _init_counting_processes(self, *args, **kwargs):
    _init(self, *args, **{**kwargs, "cpu": False})  # cpu=True (dpokit's, without a GPU) would turn DeepSpeed off
    if self.state.distributed_type == DistributedType.DEEPSPEED and torch.distributed.is_initialized():
        for state in (PartialState(), AcceleratorState()):
            state.num_processes = torch.distributed.get_world_size()
            state.process_index = state.local_process_index = torch.distributed.get_rank()


if __name__ == "__main__":
    from dpokit.cli import main

    accelerate.Accelerator.__init__ = _init_counting_processes
    sys.exit(main(sys.argv[1:]))  # a launched process's main() ends it (dpokit.launch)
