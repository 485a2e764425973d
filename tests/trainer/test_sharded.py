"""Sharded training through medtune's loop on 2 CPU processes (FSDP2 ``fully_shard`` over
gloo; Accelerate engages FSDP only on GPUs): the gathered full weights equal those of an
unsharded (DDP) run with the same seed and data, and a resumed sharded run continues
exactly. The engines for Accelerate's FSDP and DeepSpeed need GPUs (benchmarks/sharded_smoke.sh)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests import REPO

SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from safetensors.torch import save_file
from medtune.trainer import OptimConfig, ScheduleConfig, TrainConfig, make_accelerator, train
from tests.trainer.test_trainer import Regression

class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4 if i == 0 else 32, 32), nn.ReLU()) for i in range(3)])
        self.out = nn.Linear(32, 1)

    def forward(self, batch):
        x = batch["x"]
        for block in self.blocks:
            x = block(x)
        return {{"loss": ((self.out(x).squeeze(-1) - batch["y"]) ** 2).mean()}}

out = sys.argv[1]
cfg = TrainConfig(max_steps=4, batch_size=4, save_every=2, keep_last=2, log_every=1, grad_clip=1.0,
                  mixed_precision="no", optim=OptimConfig(name="adam", lr=0.01),
                  schedule=ScheduleConfig(name="constant"))  # the same lr whatever max_steps says
make_accelerator(cfg)  # the process group, before fully_shard

def run(name, sharded, steps=4, resume=None):
    accelerator = make_accelerator(cfg)  # one per run, as in one `medtune` command
    torch.manual_seed(0)
    model = Blocks()
    if sharded:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    step_cfg = TrainConfig(**{{**cfg.__dict__, "max_steps": steps}})
    result = train(model, Regression(n=64), step_cfg, f"{{out}}/{{name}}", resume=resume, accelerator=accelerator)
    if accelerator.is_main_process:
        assert result.sharded == sharded
        save_file({{k: v.contiguous() for k, v in result.state_dict.items()}}, f"{{out}}/{{name}}.safetensors")

run("ddp", sharded=False)
run("fsdp2", sharded=True)
run("resumed", sharded=True, steps=2)          # interrupted after its save at step 2 ...
run("resumed", sharded=True, resume="latest")  # ... and continued to step 4
"""


@pytest.mark.slow
def test_fsdp2_sharded_run_equals_unsharded_and_resumes_exactly(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29551", str(script), str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp, fsdp2, resumed = (load_file(str(tmp_path / f"{name}.safetensors")) for name in ("ddp", "fsdp2", "resumed"))
    assert set(fsdp2) == set(ddp) == {f"blocks.{i}.0.{p}" for i in range(3) for p in ("weight", "bias")} | {
        "out.weight", "out.bias"}
    for name in ddp:
        assert torch.allclose(fsdp2[name], ddp[name], atol=1e-5), name  # full weights, gathered from the shards
        assert torch.equal(resumed[name], fsdp2[name]), name  # the sharded state resumes exactly
    assert (tmp_path / "resumed" / "state" / "step_0000002" / "sharded").is_dir()  # torch.distributed.checkpoint


def test_engine_configs_that_cannot_work_are_refused_naming_the_setting():
    from types import SimpleNamespace

    from torch import nn

    from medtune.errors import ConfigError
    from medtune.trainer.engines import check_deepspeed, check_fsdp_wrap

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    model = nn.Sequential(Block(), Block())
    fsdp = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(transformer_cls_names_to_wrap=["Block"])))
    check_fsdp_wrap(fsdp, model)  # the model has the class: fine
    fsdp.state.fsdp_plugin.transformer_cls_names_to_wrap = ["SwinTransformerBlock"]
    with pytest.raises(ConfigError, match=r"fsdp_transformer_layer_cls_to_wrap \['SwinTransformerBlock'\].*Block"):
        check_fsdp_wrap(fsdp, model)

    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    check_deepspeed(zero3, model)  # everything trains, no hooks: fine
    model[0].requires_grad_(False)
    model[1].register_forward_hook(lambda module, inputs, output: output)  # an adapter run from a hook
    with pytest.raises(ConfigError, match="zero_stage 3"):
        check_deepspeed(zero3, model)
    check_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))), model)
