"""vLLM quantization config ``cospadi`` and its linear method.

Follows vLLM's own methods (auto_awq.py, fp8.py): a small config class, a linear method with
create_weights / process_weights_after_loading / apply, kernels in ``ops`` / ``triton_kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.parameter import BasevLLMParameter

from cospadi_vllm import format as fmt
from cospadi_vllm.ops import cospadi_gemm, expand_coefficients, gemm_backend, register_custom_op

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
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CoSpaDiConfig:
        qc = fmt.parse_quantization_config(config)
        return cls(modules=qc["modules"], value_dtype=qc["value_dtype"], ignore=list(qc["ignore"]))

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
        return CoSpaDiLinearMethod(self, names)


@dataclass
class ShardLayout:
    """Where one checkpoint module lands inside a (possibly merged, TP-sharded) layer."""

    name: str
    k: int
    s: int
    k_offset: int  # first column of this shard in the concatenated dictionary
    out_offset: int  # first output row of this shard on this rank
    out_size: int  # output rows of this shard on this rank

    @property
    def words(self) -> int:
        return fmt.mask_words(self.k)


class CoSpaDiParameter(BasevLLMParameter):
    """One of dictionary / coef_mask / coef_values / coef_scales of a merged layer.

    Places each shard where the layer expects it: dictionaries side by side along k
    (replicated over column-parallel ranks, split by input rows over row-parallel ranks);
    coefficient rows by output (split over column-parallel ranks, replicated over row-parallel).
    Records what was loaded so missing tensors are reported by name.
    """

    def __init__(self, data: torch.Tensor, role: str, shards: list[ShardLayout], **kwargs):
        super().__init__(data=data, **kwargs)
        self.role = role
        self.shards = shards
        self.loaded: set[str] = set()

    def _place(self, loaded_weight: torch.Tensor, shard: ShardLayout, source_chunk: int, row_parallel: bool) -> None:
        name = f"{shard.name}.{self.role}"
        if self.role == fmt.DICTIONARY:
            in_local = self.data.shape[0]
            rows = loaded_weight.narrow(0, self.tp_rank * in_local, in_local) if row_parallel else loaded_weight
            expected = (in_local * (self.tp_size if row_parallel else 1), shard.k)
            if tuple(loaded_weight.shape) != expected:
                raise fmt.FormatError(f"tensor {name} has shape {tuple(loaded_weight.shape)}, expected {expected}")
            self.data[:, shard.k_offset : shard.k_offset + shard.k].copy_(rows)
        else:
            width = {fmt.COEF_MASK: shard.words, fmt.COEF_VALUES: shard.s, fmt.COEF_SCALES: None}[self.role]
            out_total = loaded_weight.shape[0]
            start = 0 if row_parallel else source_chunk * shard.out_size
            if loaded_weight.dim() != (1 if width is None else 2) or (width is not None and loaded_weight.shape[1] != width) \
                    or out_total < start + shard.out_size:
                want = f"[>= {start + shard.out_size}" + ("]" if width is None else f", {width}]")
                raise fmt.FormatError(f"tensor {name} has shape {tuple(loaded_weight.shape)}, expected {want}")
            rows = loaded_weight.narrow(0, start, shard.out_size)
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

    def _load(self, loaded_weight: torch.Tensor, index: int, source_chunk: int, row_parallel: bool = False):
        shard = self.shards[index]
        self._check_dtype(loaded_weight, shard)
        self._place(loaded_weight, shard, source_chunk, row_parallel)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0, self.tp_rank)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0, 0, row_parallel=True)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, int(kwargs["shard_id"]), self.tp_rank)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        shard_id = kwargs["shard_id"]
        chunk = self.tp_rank if shard_id == "q" else self.tp_rank // kwargs["num_heads"]
        self._load(loaded_weight, self._shard_id_as_int(shard_id), chunk)


@register_weight_loader_v2_supported_method
class CoSpaDiLinearMethod(LinearMethodBase):
    """y = (x·D)·C for one (possibly merged) linear layer."""

    def __init__(self, quant_config: CoSpaDiConfig, shard_names: list[str]) -> None:
        self.quant_config = quant_config
        self.shard_names = shard_names

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
        weight_loader = extra_weight_attrs["weight_loader"]
        shards, k_offset, out_offset = [], 0, 0
        for name, out_size in zip(self.shard_names, output_partition_sizes, strict=True):
            spec = self.quant_config.modules[name]
            shards.append(ShardLayout(name, spec["k"], spec["s"], k_offset, out_offset, out_size))
            k_offset += spec["k"]
            out_offset += out_size
        k_total, out_local = k_offset, out_offset
        words = max(s.words for s in shards)
        s_max = max(s.s for s in shards)
        specs = {
            fmt.DICTIONARY: ((input_size_per_partition, k_total), fmt.DICTIONARY_DTYPE),
            fmt.COEF_MASK: ((out_local, words), fmt.MASK_DTYPE),
            fmt.COEF_VALUES: ((out_local, s_max), self.quant_config.value_dtype),
            fmt.COEF_SCALES: ((out_local,), fmt.SCALES_DTYPE),
        }
        for role, (shape, dtype) in specs.items():
            param = CoSpaDiParameter(
                data=torch.zeros(shape, dtype=dtype), role=role, shards=shards, weight_loader=weight_loader
            )
            layer.register_parameter(role, param)
        offsets = torch.cat([torch.full((s.out_size,), s.k_offset, dtype=torch.int32) for s in shards])
        layer.register_buffer("atom_offsets", offsets, persistent=False)
        layer.cospadi_k_total = k_total
        layer.cospadi_params_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for role in fmt.TENSOR_SUFFIXES:
            param = getattr(layer, role)
            for shard in param.shards:
                if shard.name not in param.loaded:
                    raise fmt.FormatError(f"checkpoint is missing tensor {shard.name}.{role}")
        # Exactly s bits per row: a mask that disagrees with the values would read garbage.
        counts = fmt.unpack_mask(layer.coef_mask.data, layer.coef_mask.shape[1] * 32).sum(1)
        for shard in layer.coef_mask.shards:
            rows = counts[shard.out_offset : shard.out_offset + shard.out_size]
            if rows.numel() and not bool((rows == shard.s).all()):
                raise fmt.FormatError(f"tensor {shard.name}.coef_mask does not have exactly s={shard.s} bits per row")
        for role in fmt.TENSOR_SUFFIXES:  # plain parameters from here on (no loader state)
            data = getattr(layer, role).data
            delattr(layer, role)
            layer.register_parameter(role, torch.nn.Parameter(data, requires_grad=False))
        layer.atom_offsets = layer.atom_offsets.to(layer.coef_mask.device)
        # D in the activation dtype once, not per call.
        dtype = layer.cospadi_params_dtype
        layer.dictionary = torch.nn.Parameter(layer.dictionary.data.to(dtype), requires_grad=False)
        if gemm_backend(layer.coef_mask.device) == "triton":
            coef_dense = torch.empty(0, device=layer.coef_mask.device)  # the kernel reads C compressed
        else:
            # Torch path (CPU): expand C once at load, in the activation dtype.
            coef_dense = expand_coefficients(
                layer.coef_mask, layer.coef_values, layer.coef_scales, layer.atom_offsets, layer.cospadi_k_total, dtype
            )
        layer.register_buffer("coef_dense", coef_dense, persistent=False)
        register_custom_op()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = cospadi_gemm(
            flat, layer.dictionary, layer.coef_mask, layer.coef_values, layer.coef_scales,
            layer.atom_offsets, layer.coef_dense,
        )
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
