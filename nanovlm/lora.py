"""LoRA: low-rank adapters on Linear layers (Hu et al., ICLR 2022).

    y = W x + b + (alpha / r) * B A dropout(x),    A: (r, in) Kaiming-uniform,  B: (out, r) zeros

W and b stay frozen and only A and B train, so at initialisation the adapted model is exactly the base model.
The conventions are PEFT's (scaling alpha / r, dropout on the input of A, A initialised like nn.Linear, B zero),
and adapters are saved in PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`, keys
`base_model.model.<module>.lora_{A,B}.weight` named as transformers' LlavaForConditionalGeneration names its
modules, and fully trained modules as PEFT's `modules_to_save`), so `peft.PeftModel.from_pretrained` puts
them on the transformers model. One PEFT adapter has one dropout: layers with different dropouts are saved
as separate adapters (nanovlm/vlm.py: VLM.save_adapter, one per tower).

An adapted layer keeps the names of the layer it replaces (`weight`, `bias`) and adds `lora_A`, `lora_B`,
so checkpoints of the base model still load into it and `merged_state_dict` writes a plain model.
"""

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoint import brief, rename, write_json, write_weights


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base layer's own parameters, shared
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.enabled = True
        self.train(base.training)  # a model put in eval mode stays there

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A, the change the adapter makes to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.enabled and not self.merged:
            update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # B A dropout(x)
            y = y + update.to(y.dtype) * self.scaling
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def add_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float, dropout: float) -> list[str]:
    """Replace every nn.Linear of `model` whose name ends in one of `targets` (PEFT's `target_modules`
    matching, e.g. "q_proj" matches "layers.3.self_attn.q_proj") by a LoRALinear; return the names."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear
             and any(name == t or name.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no Linear layer of {type(model).__name__} matches the LoRA targets {targets}")
    for name in names:
        adapt(model, name, r, alpha, dropout)
    return names


def adapt(model: nn.Module, name: str, r: int, alpha: float, dropout: float) -> LoRALinear:
    """Replace the Linear layer `name` of `model` by a LoRALinear around it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = LoRALinear(getattr(parent, child), r, alpha, dropout)
    setattr(parent, child, layer)
    return layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter of `model` is switched off inside the block (STIC's DPO reference)."""
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are merged into the weights; unmerge them before disabling them")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.enabled = enabled


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model the adapters amount to: W + (alpha / r) B A in each adapted weight,
    no LoRA entries. The model itself is left as it is."""
    state = {k: v for k, v in model.state_dict().items() if not is_lora_parameter(k)}
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            state[f"{name}.weight"] = layer.weight.detach() + layer.delta().to(layer.weight.dtype)
    return state


def checked_rename(name: str, renames: list[tuple[str, str]]) -> str:
    """A module's name under the prefix rules, which end in a dot: a module named as a rule's prefix, without
    its dot, is renamed too ("multi_modal_projector" by "multi_modal_projector.")."""
    renamed = rename(name + ".", renames)
    if renamed is None:
        raise ValueError(f"no rule maps the module {name!r}; rules: {[old for old, _ in renames]}")
    return renamed[:-1]


def save_adapter(path: str | Path, layers: dict[str, LoRALinear], base_model: str | None,
                 modules_to_save: dict[str, nn.Module] | None = None) -> None:
    """Write one PEFT adapter: the LoRA `layers` and the fully trained `modules_to_save`, each keyed by the name
    the transformers model PEFT will wrap gives that module. Layers whose r or alpha differ from the first
    layer's go into PEFT's `rank_pattern` / `alpha_pattern`; PEFT has one dropout per adapter, so the layers
    must share theirs (adapters with different dropouts are saved apart). A module to save is stored as PEFT
    stores one, `base_model.model.<module>.<parameter>`, which PEFT loads into its trainable copy."""
    if not layers:
        raise ValueError("no LoRA adapters to save")
    dropouts = {name: layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
                for name, layer in layers.items()}
    if len(set(dropouts.values())) > 1:
        raise ValueError(f"one PEFT adapter has one dropout, these layers have {sorted(set(dropouts.values()))}: "
                         "save them as separate adapters")
    path = Path(path)
    weights = {}
    for name, layer in layers.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        weights[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    for name, module in (modules_to_save or {}).items():
        weights |= {f"base_model.model.{name}.{k}": v.detach() for k, v in module.state_dict().items()}
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "bias": "none",
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": next(iter(dropouts.values())),
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        # Full module names, so that a pattern never matches a layer it was not written for.
        "target_modules": sorted(layers),
        "rank_pattern": {name: layer.r for name, layer in layers.items() if layer.r != first.r},
        "alpha_pattern": {name: layer.alpha for name, layer in layers.items() if layer.alpha != first.alpha},
    }
    write_weights(path / "adapter_model.safetensors", weights)
    write_json(path / "adapter_config.json", config)


def load_adapter(model: nn.Module, path: str | Path, module_renames: list[tuple[str, str]]) -> list[str]:
    """Add the adapters saved at `path` (PEFT's layout, full module names as save_adapter writes them) to
    `model`, load their weights and those of its modules_to_save, which `model` must have; return the names
    of the adapted layers. `module_renames` maps PEFT's module names to this model's."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    weights = load_file(path / "adapter_model.safetensors")
    used = set()

    def copy(key: str, target: torch.Tensor) -> None:
        if key not in weights:
            raise ValueError(f"{path / 'adapter_model.safetensors'} has no {key}")
        if weights[key].shape != target.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(weights[key].shape)}, the model needs "
                             f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(weights[key])
        used.add(key)

    added = []
    for peft_name in config["target_modules"]:
        r = config.get("rank_pattern", {}).get(peft_name, config["r"])
        alpha = config.get("alpha_pattern", {}).get(peft_name, config["lora_alpha"])
        name = checked_rename(peft_name, module_renames)
        layer = adapt(model, name, r, alpha, config["lora_dropout"])
        for part in ("lora_A", "lora_B"):
            copy(f"base_model.model.{peft_name}.{part}.weight", getattr(layer, part).weight)
        added.append(name)
    for peft_name in config.get("modules_to_save") or []:
        module = model.get_submodule(checked_rename(peft_name, module_renames))
        for key, tensor in module.state_dict().items():
            copy(f"base_model.model.{peft_name}.{key}", tensor)
    unused = set(weights) - used
    if unused:
        raise ValueError(f"{path}: weights for modules not in target_modules or modules_to_save: "
                         f"{brief(sorted(unused))}")
    return added
