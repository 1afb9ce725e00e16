"""Where each checkpoint module's tensors land inside a vLLM layer: fused shards and tensor parallelism.

A vLLM layer may fuse several checkpoint modules (q/k/v, gate/up: ``format.FUSED_MODULES``): their
dictionaries sit side by side, their masks / values / scales one under the other (rows padded to the
widest shard), as ``kernels.merge_shards`` describes. Under tensor parallelism (docs/format.md):

- column-parallel layers (qkv, gate_up): D split by atoms (Z = x·D is all-gathered, then put back in
  full-dictionary order by ``atom_gather_index``), C by output rows;
- row-parallel layers (o, down): D split by input rows (Z all-reduced), C by output rows; each rank
  computes its chunk of the outputs and vLLM's all-reduce of the layer output assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.parameter import BasevLLMParameter

from cospadi_vllm import format as fmt

# How a layer's dictionary and coefficients are split over tensor-parallel ranks.
REPLICATED = "replicated"  # TP = 1 (or a replicated layer): everything whole
COLUMN = "column"  # column-parallel: D split by atoms (Z all-gathered), C by output rows
ROW = "row"  # row-parallel: D split by input rows (Z all-reduced), C by output rows


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
    tp_rank: int = 0
    tp_size: int = 1


@dataclass
class LayerLayout:
    """One vLLM layer's placement: its shards, how it is split, what this rank holds."""

    split: str
    shards: list[ShardLayout]
    input_size_per_partition: int
    output_size: int  # the layer's full output count (a row-parallel rank fills its chunk of it)
    value_dtype: torch.dtype
    dictionary_dtype: torch.dtype

    @property
    def local_atoms(self) -> int:
        return sum(s.atoms_local for s in self.shards)

    @property
    def local_outputs(self) -> int:
        return sum(s.out_size for s in self.shards)

    @property
    def input_size_full(self) -> int:
        return self.input_size_per_partition * (self.shards[0].tp_size if self.split == ROW else 1)

    @property
    def out_range(self) -> tuple[int, int]:
        """[start, end) of this rank's outputs in the layer's output (row-parallel)."""
        start = self.shards[0].out_start
        return start, start + self.local_outputs

    def stored_specs(self, shard: ShardLayout) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{role: (shape, dtype)} of one checkpoint module's tensors, as stored."""
        shape = fmt.LayerShape(self.input_size_full, shard.out_full, shard.k, shard.s)
        return shape.tensor_specs(self.value_dtype, self.dictionary_dtype)

    def tensor_specs(self, owns_dictionary: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{role: (shape, dtype)} this rank holds, by the format's axes (a layer using another layer's
        dictionary loads none of the dictionary's tensors: its atoms axis is empty)."""
        specs = {}
        # input rows of this rank's dictionary tensors, in their own units (8 inputs per row of a 4-bit D)
        local = fmt.LayerShape(self.input_size_per_partition, 1, 1, 1).tensor_specs(self.value_dtype, self.dictionary_dtype)
        for role, (_, dtype) in self.stored_specs(self.shards[0]).items():
            axes = fmt.tensor_axes(role, self.dictionary_dtype)
            sizes = {fmt.IN: local[role][0][0] if role in fmt.DICTIONARY_SUFFIXES else self.input_size_per_partition,
                     fmt.OUT: self.local_outputs,
                     fmt.ATOMS: self.local_atoms if owns_dictionary or role not in fmt.DICTIONARY_SUFFIXES else 0}
            shape = tuple(sizes[a] if a in sizes else max(self.stored_specs(s)[role][0][i] for s in self.shards)
                          for i, a in enumerate(axes))
            specs[role] = (shape, dtype)
        return specs

    def atom_offsets(self) -> torch.Tensor:
        """[local outputs] int32: each output's first atom in the full dictionary (= in Z)."""
        return torch.cat([torch.full((s.out_size,), s.k_offset, dtype=torch.int32) for s in self.shards])

    def atom_gather_index(self) -> torch.Tensor:
        """Column-parallel: all-gathered Z is [rank 0: shard 0 atoms, shard 1 atoms, …][rank 1: …]…;
        this index puts it back in full-dictionary order (all k of every shard)."""
        local = self.local_atoms
        return torch.cat([
            (torch.arange(s.k) // s.atoms_local) * local + s.atoms_offset + torch.arange(s.k) % s.atoms_local
            for s in self.shards
        ]).to(torch.int32)


def split_mode(tp_size: int, input_size_per_partition: int, input_size: int, column_parallel: bool) -> str:
    if tp_size == 1:
        return REPLICATED
    if input_size_per_partition != input_size:
        return ROW
    return COLUMN if column_parallel else REPLICATED


def plan_layer(names: list[str], modules: dict[str, dict], output_partition_sizes: list[int], split: str,
               tp_rank: int, tp_size: int, kv_head_replicas: int, input_size_per_partition: int,
               output_size: int, value_dtype: torch.dtype, dictionary_dtype: torch.dtype) -> LayerLayout:
    """The shards of a layer fusing checkpoint modules ``names`` (with their k / s from ``modules``)."""
    if len(output_partition_sizes) != len(names):
        raise fmt.FormatError(f"layer fuses {len(output_partition_sizes)} outputs but checkpoint modules are {names}")
    if split == ROW and len(names) != 1:
        raise fmt.FormatError(f"row-parallel layer {names} fuses several modules; not supported")
    storage = fmt.dictionary_storage(dictionary_dtype)
    unit = max(storage.per_byte, storage.group_size or 1)
    if split == ROW and input_size_per_partition % unit:
        dtype_name = next(n for n, t in fmt.DICTIONARY_TYPES.items() if t.dtype == dictionary_dtype)
        raise fmt.FormatError(f"{names[0]}: an {dtype_name} dictionary is split over {tp_size} ranks by input rows in "
                              f"whole groups of {unit}, but each rank gets {input_size_per_partition} inputs")
    shards, k_offset, out_offset, atoms_offset = [], 0, 0, 0
    for name, out_size in zip(names, output_partition_sizes, strict=True):
        k, s = modules[name]["k"], modules[name]["s"]
        atoms_local = -(-k // tp_size) if split == COLUMN else k
        out_full, out_start = out_size, 0
        if split == ROW:  # vLLM gives row-parallel layers all outputs; this rank keeps one chunk
            chunk = -(-out_size // tp_size)
            out_start = min(out_size, tp_rank * chunk)
            out_size = min(out_size, out_start + chunk) - out_start
        elif split == COLUMN:  # vLLM already gives this rank's output count
            replicas = kv_head_replicas if shards else 1  # k / v heads may repeat over ranks
            out_start = (tp_rank // replicas) * out_size
            out_full = out_size * tp_size // replicas
        shards.append(ShardLayout(name, k, s, k_offset, out_offset, out_size, out_start, atoms_local, atoms_offset,
                                  out_full, tp_rank, tp_size))
        k_offset += k
        out_offset += out_size
        atoms_offset += atoms_local
    return LayerLayout(split, shards, input_size_per_partition, output_size, value_dtype, dictionary_dtype)


class CoSpaDiParameter(BasevLLMParameter):
    """One of dictionary / coef_mask / coef_values / coef_scales of a merged layer.

    Places each shard where the layer expects it (see ``ShardLayout`` and the split modes above).
    Records what was loaded so missing tensors are reported by name.
    """

    def __init__(self, data: torch.Tensor, role: str, layer_layout: LayerLayout, **kwargs):
        super().__init__(data=data, **kwargs)
        self.role = role
        self.layer_layout = layer_layout
        self.loaded: set[str] = set()

    def _place(self, loaded_weight: torch.Tensor, shard: ShardLayout) -> None:
        """Copy this rank's part of one checkpoint module's tensor into its place, axis by axis (format.tensor_axes)."""
        name = f"{shard.name}.{self.role}"
        want_shape, want_dtype = self.layer_layout.stored_specs(shard)[self.role]
        if want_dtype == fmt.SCALES_DTYPE and loaded_weight.is_floating_point():
            want_dtype = loaded_weight.dtype  # scales may be stored in any float dtype; held in float32
        problem = fmt.tensor_problem(name, loaded_weight.shape, loaded_weight.dtype, want_shape, want_dtype)
        if problem:
            raise fmt.FormatError(problem)
        split, source, target = self.layer_layout.split, loaded_weight, self.data
        for dim, axis in enumerate(fmt.tensor_axes(self.role, self.layer_layout.dictionary_dtype)):
            if axis == fmt.IN and split == ROW:  # this rank's input rows
                rows = target.shape[dim]
                source = source.narrow(dim, shard.tp_rank * rows, rows)
            elif axis == fmt.ATOMS:  # this shard's atoms (this rank's share of them when split by atoms)
                first = shard.tp_rank * shard.atoms_local if split == COLUMN else 0
                atoms = max(0, min(shard.atoms_local, shard.k - first))  # the last rank may hold fewer (rest zero)
                source, target = source.narrow(dim, first, atoms), target.narrow(dim, shard.atoms_offset, atoms)
            elif axis == fmt.OUT:  # this rank's outputs of this shard
                source = source.narrow(dim, shard.out_start, shard.out_size)
                target = target.narrow(dim, shard.out_offset, shard.out_size)
            elif axis == fmt.PACKED:  # rows padded to the widest shard
                target = target.narrow(dim, 0, source.shape[dim])
        target.copy_(source)
        self.loaded.add(shard.name)

    def missing(self) -> list[str]:
        """Checkpoint modules whose tensor for this role was never loaded."""
        return [shard.name for shard in self.layer_layout.shards if shard.name not in self.loaded]

    def _load(self, loaded_weight: torch.Tensor, index: int) -> None:
        self._place(loaded_weight, self.layer_layout.shards[index])

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._load(loaded_weight, 0)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, int(kwargs["shard_id"]))

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))
