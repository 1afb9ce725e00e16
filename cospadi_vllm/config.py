"""vLLM quantization config ``cospadi`` and its linear method.

Follows vLLM's own methods (auto_awq.py, fp8.py): a small config class, a linear method with
create_weights / process_weights_after_loading / apply, kernels in ``ops`` / ``triton_kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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
from vllm.model_executor.parameter import BasevLLMParameter

from cospadi_vllm import cpu_kernels, gpu_layout
from cospadi_vllm import format as fmt
from cospadi_vllm.ops import (
    coefficient_product,
    cpu_direct_max_rows,
    dictionary_product,
    gemm_backend,
    packed_coefficient_product,
    register_custom_op,
)

# vLLM fuses these checkpoint modules into one layer (Llama / Qwen2 / Qwen3).
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


@register_quantization_config(fmt.QUANT_METHOD)
class CoSpaDiConfig(QuantizationConfig):
    """Reads ``quantization_config`` of a CoSpaDi checkpoint (format version 1)."""

    def __init__(self, modules: dict[str, dict[str, int]], value_dtype: str, ignore: list[str]) -> None:
        super().__init__()
        self.modules = modules
        self.value_dtype_name = value_dtype
        self.value_dtype = fmt.value_dtype_from_name(value_dtype)
        self.ignore = ignore
        # Layers that store a dictionary, by vLLM prefix, once processed: the layers that share it
        # (cross-layer groups, docs/format.md) take that very tensor instead of a copy.
        self.dictionary_layers: dict[str, torch.nn.Module] = {}

    def __repr__(self) -> str:
        return f"CoSpaDiConfig(value_dtype={self.value_dtype_name}, modules={len(self.modules)})"

    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # bfloat16 tl.dot needs Ampere; float8 values need 8.9, checked per layer at load
        # (gpu_layout.check_capability names the dtype and the GPU's capability).
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CoSpaDiConfig:
        qc = fmt.parse_quantization_config(config)
        return cls(modules=qc["modules"], value_dtype=qc["value_dtype"], ignore=list(qc["ignore"]))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """vLLM calls this with the model path before building the model: validate the checkpoint's
        files, index and tensor headers here, so a bad checkpoint fails with one FormatError naming the
        problem instead of deep inside weight loading. (Mask bits are checked as each layer loads.)"""
        from pathlib import Path

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
        mapping = self.packed_modules_mapping or DEFAULT_PACKED_MODULES
        parts = mapping.get(leaf) or DEFAULT_PACKED_MODULES.get(leaf) or [leaf]
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


@dataclass
class ShardLayout:
    """Where one checkpoint module lands inside a (possibly merged, TP-sharded) layer."""

    name: str
    k: int
    s: int
    k_offset: int  # first column of this shard in the full concatenated dictionary (= in Z)
    out_offset: int  # first output row of this shard on this rank
    out_size: int  # output rows of this shard on this rank
    out_start: int  # first row of this shard's checkpoint tensors that this rank holds
    atoms_local: int  # dictionary columns of this shard on this rank (k, or ceil(k / tp) when split by atoms)
    atoms_offset: int  # first of them in this rank's local dictionary
    out_full: int  # output rows of the checkpoint module (all ranks)

    @property
    def words(self) -> int:
        return fmt.mask_words(self.k)


# How a layer's dictionary and coefficients are split over tensor-parallel ranks (docs/format.md).
REPLICATED = "replicated"  # TP = 1 (or a replicated layer): everything whole
COLUMN = "column"  # column-parallel: D split by atoms (Z all-gathered), C by output rows
ROW = "row"  # row-parallel: D split by input rows (Z all-reduced), C by output rows


class CoSpaDiParameter(BasevLLMParameter):
    """One of dictionary / coef_mask / coef_values / coef_scales of a merged layer.

    Places each shard where the layer expects it (see ``ShardLayout`` and the split modes above).
    Records what was loaded so missing tensors are reported by name.
    """

    def __init__(self, data: torch.Tensor, role: str, shards: list[ShardLayout], split: str, **kwargs):
        super().__init__(data=data, **kwargs)
        self.role = role
        self.shards = shards
        self.split = split
        self.loaded: set[str] = set()

    def _place(self, loaded_weight: torch.Tensor, shard: ShardLayout) -> None:
        name = f"{shard.name}.{self.role}"
        if self.role == fmt.DICTIONARY:
            in_local = self.data.shape[0]
            expected = (in_local * (self.tp_size if self.split == ROW else 1), shard.k)
            if tuple(loaded_weight.shape) != expected:
                raise fmt.FormatError(f"tensor {name} has shape {tuple(loaded_weight.shape)}, expected {expected}")
            if self.split == ROW:
                loaded_weight = loaded_weight.narrow(0, self.tp_rank * in_local, in_local)
            first_atom = self.tp_rank * shard.atoms_local if self.split == COLUMN else 0
            atoms = max(0, min(shard.atoms_local, shard.k - first_atom))  # the last rank may hold fewer (rest zero)
            self.data.narrow(1, shard.atoms_offset, atoms).copy_(loaded_weight.narrow(1, first_atom, atoms))
        else:
            width = {fmt.COEF_MASK: shard.words, fmt.COEF_VALUES: shard.s, fmt.COEF_SCALES: None}[self.role]
            want = (shard.out_full,) if width is None else (shard.out_full, width)
            if tuple(loaded_weight.shape) != want:
                raise fmt.FormatError(f"tensor {name} has shape {tuple(loaded_weight.shape)}, expected {want}")
            rows = loaded_weight.narrow(0, shard.out_start, shard.out_size)
            target = self.data.narrow(0, shard.out_offset, shard.out_size)
            if width is not None:
                target = target[:, :width]
            target.copy_(rows)
        self.loaded.add(shard.name)

    def _check_dtype(self, loaded_weight: torch.Tensor, shard: ShardLayout) -> None:
        if loaded_weight.dtype != self.data.dtype and not (
            self.role == fmt.COEF_SCALES and loaded_weight.is_floating_point()
        ):
            raise fmt.FormatError(
                f"tensor {shard.name}.{self.role} has dtype {loaded_weight.dtype}, expected {self.data.dtype}"
            )

    def _load(self, loaded_weight: torch.Tensor, index: int) -> None:
        shard = self.shards[index]
        self._check_dtype(loaded_weight, shard)
        self._place(loaded_weight, shard)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, int(kwargs["shard_id"]))

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))


def split_mode(layer: torch.nn.Module, input_size_per_partition: int, input_size: int) -> str:
    if get_tensor_model_parallel_world_size() == 1:
        return REPLICATED
    if input_size_per_partition != input_size:
        return ROW
    return COLUMN if isinstance(layer, ColumnParallelLinear) else REPLICATED


def transpose_dictionary_for_cpu(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """On CPU with bf16 activations, hold D transposed ([k, in]: each atom's weights contiguous, the same
    bytes) for the C++ ops: the decode kernel streams it front to back, and torch's GEMM reads the
    transposed view for prefill (benchmarks/results/NOTES.md item 30)."""
    dictionary = layer.dictionary.data
    if dtype == torch.bfloat16 and dictionary.dtype == torch.bfloat16:
        layer.dictionary = torch.nn.Parameter(dictionary.t().contiguous(), requires_grad=False)
        layer.cospadi_dictionary_transposed = True


def pack_coefficients_for_gpu(layer: torch.nn.Module) -> None:
    """On GPUs, C in the layout the Triton kernels read (gpu_layout.py); the stored mask and values are
    replaced (not copied), so C is held once. The GPU's capability is checked for the value dtype here."""
    gpu_layout.check_capability(layer.coef_values.dtype, layer.coef_values.device)
    packed = gpu_layout.repack(layer.coef_mask.data, layer.coef_values.data, layer.coef_scales.data, layer.atom_offsets)
    for role, data in ((fmt.COEF_MASK, packed.mask_words), (fmt.COEF_VALUES, packed.values),
                       (fmt.COEF_SCALES, packed.scales)):
        setattr(layer, role, torch.nn.Parameter(data, requires_grad=False))
    layer.register_buffer("value_starts", packed.value_starts, persistent=False)
    layer.register_buffer("shard_table", packed.shard_table, persistent=False)
    layer.cospadi_packed = packed


@register_weight_loader_v2_supported_method
class CoSpaDiLinearMethod(LinearMethodBase):
    """y = (x·D)·C for one (possibly merged) linear layer."""

    def __init__(self, quant_config: CoSpaDiConfig, shard_names: list[str], prefix: str = "",
                 dictionary_owner: str | None = None) -> None:
        self.quant_config = quant_config
        self.shard_names = shard_names
        self.prefix = prefix
        self.dictionary_owner = dictionary_owner  # vLLM layer whose dictionary this one uses (None: its own)

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
        if len(output_partition_sizes) != len(self.shard_names):
            raise fmt.FormatError(
                f"layer fuses {len(output_partition_sizes)} outputs but checkpoint modules are {self.shard_names}"
            )
        split = split_mode(layer, input_size_per_partition, input_size)
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if split == ROW and len(self.shard_names) != 1:
            raise fmt.FormatError(f"row-parallel layer {self.shard_names} fuses several modules; not supported")
        weight_loader = extra_weight_attrs["weight_loader"]
        shards, k_offset, out_offset, atoms_offset = [], 0, 0, 0
        for name, out_size in zip(self.shard_names, output_partition_sizes, strict=True):
            spec = self.quant_config.modules[name]
            atoms_local = -(-spec["k"] // tp_size) if split == COLUMN else spec["k"]
            out_full, out_start = out_size, 0
            if split == ROW:  # vLLM gives row-parallel layers all outputs; this rank keeps one chunk
                chunk = -(-out_size // tp_size)
                out_start = min(out_size, tp_rank * chunk)
                out_size = min(out_size, out_start + chunk) - out_start
            elif split == COLUMN:  # vLLM already gives this rank's output count
                replicas = getattr(layer, "num_kv_head_replicas", 1) if shards else 1  # k / v heads may repeat
                out_start = (tp_rank // replicas) * out_size
                out_full = out_size * tp_size // replicas
            shards.append(ShardLayout(name, spec["k"], spec["s"], k_offset, out_offset, out_size, out_start,
                                      atoms_local, atoms_offset, out_full))
            k_offset += spec["k"]
            out_offset += out_size
            atoms_offset += atoms_local
        out_local = out_offset
        words = max(s.words for s in shards)
        s_max = max(s.s for s in shards)
        # A layer that shares another layer's dictionary gets that tensor after loading; nothing to load here.
        dictionary_atoms = atoms_offset if self.dictionary_owner is None else 0
        specs = {
            fmt.DICTIONARY: ((input_size_per_partition, dictionary_atoms), fmt.DICTIONARY_DTYPE),
            fmt.COEF_MASK: ((out_local, words), fmt.MASK_DTYPE),
            fmt.COEF_VALUES: ((out_local, s_max), self.quant_config.value_dtype),
            fmt.COEF_SCALES: ((out_local,), fmt.SCALES_DTYPE),
        }
        for role, (shape, dtype) in specs.items():
            param = CoSpaDiParameter(
                data=torch.zeros(shape, dtype=dtype), role=role, shards=shards, split=split,
                weight_loader=weight_loader,
            )
            layer.register_parameter(role, param)
        offsets = torch.cat([torch.full((s.out_size,), s.k_offset, dtype=torch.int32) for s in shards])
        layer.register_buffer("atom_offsets", offsets, persistent=False)
        if split == COLUMN:
            # All-gathered Z is [rank 0: shard 0 atoms, shard 1 atoms, …][rank 1: …]…; this index puts
            # it back in full-dictionary order (all k of every shard).
            local = atoms_offset
            index = torch.cat([
                (torch.arange(s.k) // s.atoms_local) * local + s.atoms_offset + torch.arange(s.k) % s.atoms_local
                for s in shards
            ])
            layer.register_buffer("atom_gather_index", index.to(torch.int32), persistent=False)
        layer.cospadi_split = split
        layer.cospadi_shards = shards
        layer.cospadi_params_dtype = params_dtype
        layer.cospadi_dictionary_transposed = False  # D held as [k, in] (CPU, bf16): see transpose_dictionary_for_cpu
        layer.cospadi_cpu_call = None  # (value table, value kind, direct_max_rows) of the C++ ops, on CPU
        layer.cospadi_out_range = (shards[0].out_start, shards[0].out_start + out_local, output_size)
        layer.cospadi_dictionary_shape = (input_size_per_partition, atoms_offset)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        owner = self.dictionary_owner
        for role in fmt.TENSOR_SUFFIXES if owner is None else fmt.COEF_SUFFIXES:
            param = getattr(layer, role)
            for shard in param.shards:
                if shard.name not in param.loaded:
                    raise fmt.FormatError(f"checkpoint is missing tensor {shard.name}.{role}")
        # Exactly s bits per row within k: a mask that disagrees with the values would read garbage.
        for shard in layer.coef_mask.shards:
            fmt.check_mask_bits(shard.name, layer.coef_mask.data.narrow(0, shard.out_offset, shard.out_size),
                                shard.k, shard.s)
        for role in fmt.TENSOR_SUFFIXES:  # plain parameters from here on (no loader state)
            data = getattr(layer, role).data
            delattr(layer, role)
            layer.register_parameter(role, torch.nn.Parameter(data, requires_grad=False))
        dtype = layer.cospadi_params_dtype
        if owner is not None:
            self._use_owner_dictionary(layer, owner)
        elif dtype.itemsize == fmt.DICTIONARY_DTYPE.itemsize and dtype != fmt.DICTIONARY_DTYPE:
            # float16 activations: D in float16 once (same bytes) instead of a conversion per call.
            # float32 activations keep D in bfloat16 (half the bytes) and convert per call.
            layer.dictionary = torch.nn.Parameter(layer.dictionary.data.to(dtype), requires_grad=False)
        layer.atom_offsets = layer.atom_offsets.to(layer.coef_mask.device)
        if hasattr(layer, "atom_gather_index"):
            layer.atom_gather_index = layer.atom_gather_index.to(layer.coef_mask.device)
        layer.cospadi_packed = None
        if gemm_backend(layer.coef_mask.device) == "cpu":
            cpu_kernels.load()  # build / load the C++ kernels now, not inside the first forward
            if owner is None:
                transpose_dictionary_for_cpu(layer, dtype)
            # apply() calls the C++ ops directly: the custom-op wrapper's Python was ~15 µs per call,
            # 10–25 % of a SmolLM2 layer at decode (benchmarks/results/NOTES.md item 29).
            values_dtype = layer.coef_values.dtype
            layer.cospadi_cpu_call = (*cpu_kernels.value_decoding(values_dtype),
                                      cpu_direct_max_rows(dtype, values_dtype))
        else:
            pack_coefficients_for_gpu(layer)
        if owner is None:
            self.quant_config.dictionary_layers[self.prefix] = layer
        register_custom_op()

    def _use_owner_dictionary(self, layer: torch.nn.Module, owner: str) -> None:
        """Point ``layer`` at the (already processed) dictionary of layer ``owner``: one tensor for the
        whole group. vLLM processes layers in model order, and a group's
        dictionary is stored by its first layer."""
        source = self.quant_config.dictionary_layers.get(owner)
        if source is None:
            raise fmt.FormatError(f"{self.prefix} uses the dictionary of {owner}, which has not been loaded "
                                  "(a shared dictionary must be stored by the group's first layer)")
        if source.cospadi_dictionary_shape != layer.cospadi_dictionary_shape:
            raise fmt.FormatError(f"{self.prefix} uses the dictionary of {owner}, whose shape "
                                  f"{source.cospadi_dictionary_shape} differs from {layer.cospadi_dictionary_shape}")
        layer.dictionary = source.dictionary
        layer.cospadi_dictionary_transposed = source.cospadi_dictionary_transposed

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if layer.cospadi_dictionary_transposed:
            table, kind, direct_max_rows = layer.cospadi_cpu_call
            if layer.cospadi_split == REPLICATED:  # the whole layer in one C++ call
                out = torch.ops.cospadi_cpu.linear(flat, layer.dictionary, layer.coef_mask, layer.coef_values,
                                                   layer.coef_scales, layer.atom_offsets, table, kind, direct_max_rows)
                return self._finish(layer, out, x, bias)
            z = torch.ops.cospadi_cpu.dictionary_product(flat, layer.dictionary)
        else:
            z = dictionary_product(flat, layer.dictionary)
        if layer.cospadi_split == COLUMN:  # each rank has its share of the atoms: gather all k
            z = tensor_model_parallel_all_gather(z, dim=-1).index_select(1, layer.atom_gather_index)
        elif layer.cospadi_split == ROW:  # each rank has a partial sum over its input rows
            z = tensor_model_parallel_all_reduce(z)
        if layer.cospadi_packed is not None:
            out = packed_coefficient_product(z, layer.cospadi_packed)
        elif layer.cospadi_cpu_call is not None:
            table, kind, direct_max_rows = layer.cospadi_cpu_call
            out = torch.ops.cospadi_cpu.coef_product(z, layer.coef_mask, layer.coef_values, layer.coef_scales,
                                                     layer.atom_offsets, table, kind, False, False, direct_max_rows)
        else:
            out = coefficient_product(z, layer.coef_mask, layer.coef_values, layer.coef_scales, layer.atom_offsets)
        if layer.cospadi_split == ROW:
            # This rank computed its chunk of the outputs; vLLM's all-reduce of the row-parallel
            # output then assembles them (the other ranks contribute zeros there).
            start, end, total = layer.cospadi_out_range
            full = out.new_zeros((out.shape[0], total))
            full[:, start:end] = out
            out = full
        return self._finish(layer, out, x, bias)

    @staticmethod
    def _finish(layer: torch.nn.Module, out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
