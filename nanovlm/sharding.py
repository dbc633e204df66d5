"""Fully sharded data parallelism (FSDP2, PyTorch's `fully_shard`) for the shared training loop (`--fsdp`).

Each process keeps 1/N of every parameter, gradient and optimizer state instead of a whole copy, which is what
lets full fine-tuning of a 7B model fit: AdamW over fp32 master weights is 16 bytes a parameter, 112 GB for 7B,
14 GB a GPU on 8 (nanovlm/memory_plan.py counts it before a run).
- Units: every transformer block of the LLM and of every vision tower is its own FSDP unit (its weights are
  all-gathered just before it runs and freed after), then the root takes the rest (embeddings, projector, norms,
  lm_head). Frozen parts are sharded too, never in the optimizer.
- Precision: on CUDA, bf16 compute (weights all-gathered in bf16) over fp32 master weights, gradients reduced
  in fp32 (`MixedPrecisionPolicy`); on CPU (gloo) everything is fp32.
- Gradient accumulation: the reduce-scatter runs on a step's last micro-batch only; the micro-batches before
  accumulate the full (unsharded) fp32 gradient locally, which the memory plan counts.
- A micro-batch without images leaves the vision tower unused on that rank: unused parameters reduce-scatter
  zeros, so that every rank takes part in the same collectives (DDP's find_unused_parameters).
- Checkpoints: `torch.distributed.checkpoint` writes one file per rank and reshards on load, so a run can
  resume on another number of processes.
- When training ends, the full weights are gathered parameter by parameter into a plain model again, so a
  recipe saves, evaluates or trains it further exactly as after a DDP run.
torch.distributed's FSDP, DTensor and checkpoint modules are imported where they are used: importing them takes
over a second, which every run would pay before its first line of output, sharded or not.
"""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import llm, vision
from .lora import adapt, lora_layers
from .vlm import VLM

BLOCKS = (llm.Block, vision.Block)  # the FSDP units below the root


def shard(objective: nn.Module, groups: dict[str, list[tuple[str, nn.Parameter]]],
          device: torch.device) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Shard `objective` in place over every process (one without torchrun); return `groups` holding the new,
    sharded parameters in place of the old ones (FSDP replaces each parameter by a DTensor of its shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # a single process, started without torchrun
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)
    names = {id(p): name for name, p in objective.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for module in objective.modules():
        if isinstance(module, BLOCKS):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(objective, mesh=mesh, mp_policy=policy)
    objective.set_reduce_scatter_unused_params(True)
    params = dict(objective.named_parameters())
    return {group: [(name, params[names[id(p)]]) for name, p in named] for group, named in groups.items()}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value (gathered from every rank, so every rank must call it); a plain one as is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.nn.utils.get_total_norm over plain or sharded tensors: the norm of sharded ones is a DTensor, whose
    full value (an all-reduce) is the norm of the whole."""
    return full(torch.nn.utils.get_total_norm(tensors))


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trained weights and of the optimizer state into folder `path`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(trained_state(model, optimizer), checkpoint_id=path)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what save_sharded wrote, whatever the number of processes that wrote it, into this rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = trained_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def trained_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's shards of the trained weights (frozen ones never change) and of the optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optimizer_state}


def unshard(model: VLM) -> None:
    """Put the full weights back into `model` (every rank), one parameter gathered at a time, as plain modules:
    the same architecture, LoRA layers and settings, with the sharded modules left to be freed with the
    objective that holds them. Each weight keeps its dtype (fp32 masters stay fp32, as after DDP)."""
    from torch.distributed.tensor import DTensor

    with torch.device("meta"):
        plain = VLM(model.cfg)
    for name, layer in lora_layers(model).items():
        dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
        adapt(plain, name, layer.r, layer.alpha, dropout).enabled = layer.enabled
    full, requires_grad = {}, {}
    for name, p in model.named_parameters():  # a tied weight once
        full[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        requires_grad[name] = p.requires_grad
    plain.load_state_dict(full, strict=False, assign=True)
    plain.language_model.tie_weights()
    for name, p in plain.named_parameters():
        p.requires_grad_(requires_grad[name])
    plain.language_model.gradient_checkpointing = model.language_model.gradient_checkpointing
    for tower, own in zip(plain.vision_towers, model.vision_towers):
        tower.gradient_checkpointing = own.gradient_checkpointing
    plain.train(model.training)
    for name, child in plain.named_children():
        setattr(model, name, child)
