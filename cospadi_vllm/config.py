"""vLLM quantization config ``cospadi`` and its linear method.

Follows vLLM's own methods (auto_awq.py, gptq_marlin.py): a small config class, and a linear method
per layer with create_weights / process_weights_after_loading / apply that places the tensors
(``tp_layout``) and hands the products to the kernel chosen for the layer (``kernels``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import vllm
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from cospadi_vllm import format as fmt
from cospadi_vllm.kernels import CoSpaDiKernel, KernelConfig, choose_kernel
from cospadi_vllm.tp_layout import COLUMN, REPLICATED, ROW, CoSpaDiParameter, LayerLayout, plan_layer, split_mode

# The vLLM releases this plugin is tested with; it uses their internals (weight loader v2 parameters,
# ``vllm.utils.torch_utils``), which move between releases.
SUPPORTED_VLLM = "0.32."
if not vllm.__version__.startswith(SUPPORTED_VLLM):
    raise ImportError(f"cospadi_vllm supports vLLM {SUPPORTED_VLLM}x; this environment has vLLM {vllm.__version__}")


@register_quantization_config(fmt.QUANT_METHOD)
class CoSpaDiConfig(QuantizationConfig):
    """Reads ``quantization_config`` of a CoSpaDi checkpoint (format version 1)."""

    def __init__(self, modules: dict[str, dict], ignore: list[str]) -> None:
        """``modules``: parsed entries (``format.parse_quantization_config``), each naming its storage types."""
        super().__init__()
        self.modules = modules
        self.ignore = ignore
        # Layers that store a dictionary, by vLLM prefix, once processed: the layers that share it
        # (cross-layer groups, docs/format.md) take that very tensor instead of a copy.
        self.dictionary_layers: dict[str, torch.nn.Module] = {}

    def __repr__(self) -> str:
        types = sorted({(spec["value_dtype"], spec["dictionary_dtype"]) for spec in self.modules.values()})
        return f"CoSpaDiConfig(modules={len(self.modules)}, (value_dtype, dictionary_dtype)={types})"

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # bfloat16 tl.dot needs Ampere; float8 values need 8.9, checked per layer when its kernel is chosen.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CoSpaDiConfig:
        qc = fmt.parse_quantization_config(config)
        return cls(modules=qc["modules"], ignore=list(qc["ignore"]))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """vLLM calls this with the model path before building the model: validate the checkpoint's
        files, index and tensor headers here, so a bad checkpoint fails with one FormatError naming the
        problem instead of deep inside weight loading. (Mask bits are checked as each layer loads.)"""
        from cospadi_vllm.check import check_checkpoint

        if not Path(model_name).is_dir():
            return  # a hub id: nothing local to read before vLLM downloads it
        problems = check_checkpoint(model_name, masks=False)
        if problems:
            more = f" (and {len(problems) - 1} more problems: `cospadi-vllm check {model_name}` lists them)" \
                if len(problems) > 1 else ""
            raise fmt.FormatError(problems[0] + more)

    def shard_names(self, prefix: str) -> list[str]:
        """Checkpoint module names that vLLM's layer ``prefix`` is made of, in shard order."""
        parent, _, leaf = prefix.rpartition(".")
        mapping = self.packed_modules_mapping or fmt.FUSED_MODULES
        parts = mapping.get(leaf) or fmt.FUSED_MODULES.get(leaf) or [leaf]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None
        names = self.shard_names(prefix)
        present = [n in self.modules for n in names]
        if not any(present) or any(prefix == i or prefix.startswith(f"{i}.") for i in self.ignore):
            return UnquantizedLinearMethod()
        if not all(present):
            missing = [n for n, p in zip(names, present, strict=True) if not p]
            raise fmt.FormatError(
                f"{prefix}: vLLM fuses {names}, but quantization_config.modules lacks {missing}; "
                "fused modules must be compressed together"
            )
        return CoSpaDiLinearMethod(self, names, prefix, self.dictionary_owner_layer(prefix, names))

    def dictionary_owner_layer(self, prefix: str, names: list[str]) -> str | None:
        """The vLLM layer whose dictionary layer ``prefix`` uses, or None if it stores its own.

        vLLM concatenates the dictionaries of fused modules (q/k/v, gate/up), so a fused layer can use
        another layer's dictionary only if each of its modules shares the same-position module's one."""
        owners = [fmt.dictionary_owner(self.modules, n) for n in names]
        if owners == names:
            return None
        owner_layer = f"{owners[0].rpartition('.')[0]}.{prefix.rpartition('.')[2]}"
        if self.shard_names(owner_layer) != owners:
            raise fmt.FormatError(
                f"{prefix}: vLLM fuses {names} into one layer, so they must share the dictionaries of one other "
                f"layer's {', '.join(n.rpartition('.')[2] for n in names)} together; quantization_config has "
                f"them using {owners}")
        return owner_layer


@register_weight_loader_v2_supported_method
class CoSpaDiLinearMethod(LinearMethodBase):
    """y = (x·D)·C for one (possibly merged, tensor-parallel) layer; one instance per layer."""

    def __init__(self, quant_config: CoSpaDiConfig, shard_names: list[str], prefix: str = "",
                 dictionary_owner: str | None = None) -> None:
        self.quant_config = quant_config
        self.shard_names = shard_names
        self.prefix = prefix
        self.dictionary_owner = dictionary_owner  # vLLM layer whose dictionary this one uses (None: its own)
        # Storage types of this layer's modules (the same for all: parse_quantization_config checks fused modules).
        spec = quant_config.modules[shard_names[0]]
        self.value_dtype_name, self.dictionary_dtype_name = spec["value_dtype"], spec["dictionary_dtype"]
        self.value_dtype, self.dictionary_dtype = fmt.module_dtypes(spec)
        self.layout: LayerLayout | None = None
        self.kernel: CoSpaDiKernel | None = None
        self.params_dtype = torch.bfloat16

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        split = split_mode(tp_size, input_size_per_partition, input_size, isinstance(layer, ColumnParallelLinear))
        self.layout = plan_layer(self.shard_names, self.quant_config.modules, output_partition_sizes, split, tp_rank,
                                 tp_size, getattr(layer, "num_kv_head_replicas", 1), input_size_per_partition,
                                 output_size, self.value_dtype, self.dictionary_dtype)
        self.params_dtype = params_dtype
        specs = self.layout.tensor_specs(owns_dictionary=self.dictionary_owner is None)
        for role, (shape, dtype) in specs.items():
            layer.register_parameter(role, CoSpaDiParameter(data=torch.zeros(shape, dtype=dtype), role=role,
                                                            layer_layout=self.layout,
                                                            weight_loader=extra_weight_attrs["weight_loader"]))
        layer.register_buffer("atom_offsets", self.layout.atom_offsets(), persistent=False)
        if split == COLUMN:
            layer.register_buffer("atom_gather_index", self.layout.atom_gather_index(), persistent=False)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        owns = self.dictionary_owner is None
        roles = list(self.layout.stored_specs(self.layout.shards[0]))  # the tensors its modules store
        for role in [r for r in roles if owns or r not in fmt.DICTIONARY_SUFFIXES]:  # what it loads
            missing = getattr(layer, role).missing()
            if missing:
                raise fmt.FormatError(fmt.missing_tensor(f"{missing[0]}.{role}"))
        # Exactly s bits per row within k: a mask that disagrees with the values would read garbage.
        for shard in self.layout.shards:
            fmt.check_mask_bits(shard.name, layer.coef_mask.data.narrow(0, shard.out_offset, shard.out_size),
                                shard.k, shard.s)
        for role in roles:  # plain parameters from here on (no loader state)
            data = getattr(layer, role).data
            delattr(layer, role)
            layer.register_parameter(role, torch.nn.Parameter(data, requires_grad=False))
        if not owns:
            for role, tensor in self._owner_dictionary().items():
                setattr(layer, role, tensor)
        device = layer.coef_mask.device
        layer.atom_offsets = layer.atom_offsets.to(device)
        if hasattr(layer, "atom_gather_index"):
            layer.atom_gather_index = layer.atom_gather_index.to(device)
        self.kernel = choose_kernel(KernelConfig(device, self.params_dtype, self.value_dtype, self.dictionary_dtype,
                                                 self.prefix))
        self.kernel.process_weights_after_loading(layer, owns_dictionary=owns)
        if owns:
            self.quant_config.dictionary_layers[self.prefix] = layer

    def _owner_dictionary(self) -> dict[str, torch.nn.Parameter]:
        """The (already processed) dictionary tensors of the layer this one shares: one copy for the whole
        group. vLLM processes layers in model order, and a group's dictionary is stored by its first layer."""
        owner = self.dictionary_owner
        source = self.quant_config.dictionary_layers.get(owner)
        if source is None:
            raise fmt.FormatError(f"{self.prefix} uses the dictionary of {owner}, which has not been loaded "
                                  "(a shared dictionary must be stored by the group's first layer)")
        theirs, mine = source.quant_method.layout, self.layout
        if (theirs.input_size_per_partition, theirs.local_atoms) != (mine.input_size_per_partition, mine.local_atoms):
            raise fmt.FormatError(f"{self.prefix} uses the dictionary of {owner}, whose shape "
                                  f"{(theirs.input_size_per_partition, theirs.local_atoms)} differs from "
                                  f"{(mine.input_size_per_partition, mine.local_atoms)}")
        return {role: getattr(source, role) for role in fmt.DICTIONARY_SUFFIXES if hasattr(source, role)}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        split = self.layout.split
        if split == REPLICATED:  # the whole layer in one kernel call
            out = self.kernel.apply(layer, flat)
        else:
            z = self.kernel.dictionary_product(layer, flat)
            if split == COLUMN:  # each rank has its share of the atoms: gather all k
                z = tensor_model_parallel_all_gather(z, dim=-1).index_select(1, layer.atom_gather_index)
            else:  # each rank has a partial sum over its input rows
                z = tensor_model_parallel_all_reduce(z)
            out = self.kernel.coefficient_product(layer, z)
        if split == ROW:
            # This rank computed its chunk of the outputs; vLLM's all-reduce of the row-parallel
            # output then assembles them (the other ranks contribute zeros there).
            start, end = self.layout.out_range
            full = out.new_zeros((out.shape[0], self.layout.output_size))
            full[:, start:end] = out
            out = full
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
