"""LoRA written out (Hu et al. 2021, PEFT's initialisation): adapters on the language model's
linears, and their merge back into plain weights for vLLM, export and transformers.
model.load_fsdp_model applies them before FSDP2; model.save_lora_adapter writes PEFT's files."""
import torch


class LoRALinear(torch.nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * alpha / rank (Hu et al. 2021), `base` frozen. PEFT's
    init: A (rank, in) kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B (out, rank) zeros."""

    def __init__(self, base, *, rank, alpha, dropout, generator):
        super().__init__()
        self.base, self.scale, self.dropout = base, alpha / rank, torch.nn.Dropout(dropout)
        A = torch.nn.init.kaiming_uniform_(torch.empty(rank, base.in_features), a=5 ** 0.5,
                                           generator=generator)
        # Drawn on the CPU, then moved to base's device and dtype.
        self.lora_A = torch.nn.Parameter(A.to(base.weight))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank).to(base.weight))

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale


def apply_lora(model, *, rank, alpha, dropout=0.0, seed=0,
               targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")):
    """Freeze `model`, then wrap each nn.Linear named one of `targets` in the language model's
    layers (not the vision tower, whose MLP is named alike) in a LoRALinear; before FSDP. Names:
    `<m>.base.weight`, `<m>.base.bias` (frozen), `<m>.lora_A` (rank, in), `<m>.lora_B` (out, rank).
    A comes from a generator seeded with `seed`: every rank draws the same. `model.lora` keeps the
    settings, for the savers."""
    model.requires_grad_(False)
    generator, layers = torch.Generator().manual_seed(seed), model.model.language_model.layers
    for name, module in list(layers.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in targets:
            layers.set_submodule(name, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout,
                                                  generator=generator))
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets), seed=seed)
    return model


def merge_lora(named_tensors, *, scale):
    """(name, full tensor) pairs of a LoRA model (rollout.full_weights, a state dict) under the
    plain HF names: `<m>.weight` = base.weight + scale * lora_B @ lora_A (in float32), `<m>.bias` =
    base.bias, the rest as they come. A module's three tensors may come in any order."""
    pending = {}  # module -> {"weight", "lora_A", "lora_B"} so far
    for name, t in named_tensors:
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base") and leaf == "bias":
            yield module.removesuffix(".base") + ".bias", t
        elif module.endswith(".base") or leaf in ("lora_A", "lora_B"):
            module = module.removesuffix(".base")
            pending.setdefault(module, {})[leaf] = t
            if len(pending[module]) == 3:
                w, A, B = map(pending.pop(module).get, ("weight", "lora_A", "lora_B"))
                yield module + ".weight", (w.float() + scale * (B.float() @ A.float())).to(w.dtype)
        else:
            yield name, t
    assert not pending, f"LoRA modules missing a tensor: {sorted(pending)}"


def merged_hf_weights(model, named_tensors):
    """(name, full tensor) pairs of `model` under the plain Qwen2.5-VL names: adapters merged."""
    lora = getattr(model, "lora", None)
    return merge_lora(named_tensors, scale=lora["alpha"] / lora["rank"]) if lora else named_tensors


def hf_state_dict(model, state):
    return dict(merged_hf_weights(model, state.items()))  # a full state dict, plain names
