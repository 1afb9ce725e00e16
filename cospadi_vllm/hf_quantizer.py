"""CoSpaDi checkpoints in Hugging Face transformers: ``import cospadi_vllm`` and then
``AutoModelForCausalLM.from_pretrained(ckpt)`` loads the compressed layers as they are stored.

transformers' quantizer API (``HfQuantizer``): before the weights are loaded, every linear listed in
``quantization_config.modules`` becomes a :class:`CoSpaDiLinear` holding ``dictionary`` /
``coef_mask`` / ``coef_values`` / ``coef_scales`` (and ``bias``) with their stored dtypes; the loader
then fills them from the safetensors. The forward pass is the vLLM plugin's: Z = x·D, then Z·C by
the same kernels (C++ on CPU, Triton on CUDA) — no dense copy of C. ``save_pretrained`` writes the
same tensors and the same ``quantization_config`` back.

transformers checks neither shapes nor (for floating tensors) dtypes of pre-quantized weights and
only warns about missing ones, so this module validates the safetensors headers before loading and
every tensor after it, raising :class:`~cospadi_vllm.format.FormatError` naming the tensor.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from cospadi_vllm import format as fmt
from cospadi_vllm import gpu_layout
from cospadi_vllm.ops import coefficient_product_impl, dictionary_product, packed_coefficient_product_impl


class CoSpaDiHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a CoSpaDi checkpoint; written back exactly as it was read."""

    def __init__(self, **config: Any) -> None:
        self._config = copy.deepcopy(config)
        parsed = fmt.parse_quantization_config(config)
        self.quant_method = fmt.QUANT_METHOD
        self.modules: dict[str, dict[str, int]] = parsed["modules"]
        self.value_dtype = fmt.value_dtype_from_name(parsed["value_dtype"])

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class CoSpaDiLinear(torch.nn.Module):
    """y = (x·D)·C + b with C in its stored form. Tensors are buffers: nothing here is trainable."""

    def __init__(self, in_features: int, out_features: int, k: int, s: int, value_dtype: torch.dtype,
                 bias_dtype: torch.dtype | None, device: torch.device | str = "meta",
                 owns_dictionary: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        # A layer of a shared-dictionary group that does not store it uses its owner's buffer (set by
        # ``share_dictionary_of``), held outside the module tree so it is neither saved nor moved twice.
        self._dictionary_owner: list[CoSpaDiLinear] = []
        specs = fmt.LayerShape(in_features, out_features, k, s).tensor_specs(value_dtype)
        for suffix, (shape, dtype) in specs.items():
            if suffix != fmt.DICTIONARY or owns_dictionary:
                self.register_buffer(suffix, torch.empty(shape, dtype=dtype, device=device))
        if bias_dtype is None:
            self.bias = None
        else:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device))
        self.register_buffer("atom_offsets", torch.zeros(out_features, dtype=torch.int32, device=device),
                             persistent=False)
        self._packed: gpu_layout.PackedCoefficients | None = None

    def packed_coefficients(self) -> gpu_layout.PackedCoefficients:
        """C in the GPU layout (gpu_layout.py), made on the first CUDA forward and kept beside the stored
        tensors, which ``save_pretrained`` writes: on a GPU this module holds C twice (run one forward
        before capturing CUDA graphs, so the repack is not captured)."""
        if self._packed is None or self._packed.mask_words.device != self.coef_mask.device:
            gpu_layout.check_capability(self.coef_values.dtype, self.coef_values.device)
            self._packed = gpu_layout.repack(self.coef_mask, self.coef_values, self.coef_scales, self.atom_offsets)
        return self._packed

    def share_dictionary_of(self, owner: CoSpaDiLinear) -> None:
        self._dictionary_owner[:] = [owner]

    def dictionary_tensor(self) -> torch.Tensor:
        """D [in, k]: this layer's buffer, or the one of the layer whose dictionary it shares."""
        return self._dictionary_owner[0].dictionary if self._dictionary_owner else self.dictionary

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {suffix: self.dictionary_tensor() if suffix == fmt.DICTIONARY else getattr(self, suffix)
                for suffix in fmt.TENSOR_SUFFIXES}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        z = dictionary_product(flat, self.dictionary_tensor())
        if z.is_cuda:
            packed = self.packed_coefficients()
            y = packed_coefficient_product_impl(z, *packed.tensors(), list(packed.shard_outputs))
        else:
            y = coefficient_product_impl(z, self.coef_mask, self.coef_values, self.coef_scales, self.atom_offsets)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class CoSpaDiHfQuantizer(HfQuantizer):
    """Loads pre-compressed CoSpaDi checkpoints (there is no on-the-fly compression here)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config: CoSpaDiHfConfig = self.quantization_config
        headers = fmt.read_safetensors_headers(checkpoint_files) if checkpoint_files else None
        for name, spec in config.modules.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError as err:
                raise fmt.FormatError(f"quantization_config.modules names {name}, which this model does not have") from err
            if not isinstance(linear, torch.nn.Linear):
                raise fmt.FormatError(f"{name} is a {type(linear).__name__}, not a linear layer")
            shape = fmt.LayerShape(linear.in_features, linear.out_features, spec["k"], spec["s"])
            owner = fmt.dictionary_owner(config.modules, name)
            bias_dtype = None
            if headers is not None:
                problems = fmt.layer_header_problems(name, headers, shape, config.value_dtype, owner,
                                                      fmt.dictionary_users(config.modules, name))
                if problems:
                    raise fmt.FormatError(problems[0])
                if f"{name}.bias" in headers:  # keep the bias in its stored dtype
                    bias_dtype = _dtype_from_header(headers[f"{name}.bias"][0])
            elif linear.bias is not None:
                bias_dtype = linear.bias.dtype
            model.set_submodule(name, CoSpaDiLinear(linear.in_features, linear.out_features, spec["k"], spec["s"],
                                                    config.value_dtype, bias_dtype, owns_dictionary=owner == name))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config: CoSpaDiHfConfig = self.quantization_config
        for name, module in model.named_modules():
            if not isinstance(module, CoSpaDiLinear):
                continue
            owner = fmt.dictionary_owner(config.modules, name)
            if owner != name:
                module.share_dictionary_of(model.get_submodule(owner))
            for suffix in (*fmt.TENSOR_SUFFIXES, *(("bias",) if module.bias is not None else ())):
                tensor = module.dictionary_tensor() if suffix == fmt.DICTIONARY else getattr(module, suffix)
                if tensor.is_meta or not getattr(tensor, "_is_hf_initialized", True):
                    raise fmt.FormatError(f"checkpoint is missing tensor "
                                          f"{owner if suffix == fmt.DICTIONARY else name}.{suffix}")
            shape = fmt.LayerShape(module.in_features, module.out_features, module.k, module.s)
            fmt.check_layer_tensors(name, module.stored_tensors(), shape, module.coef_values.dtype)
            fmt.check_mask_bits(name, module.coef_mask, module.k, module.s)
            module.atom_offsets = torch.zeros(module.out_features, dtype=torch.int32, device=module.coef_mask.device)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _dtype_from_header(name: str) -> torch.dtype:
    by_name = {v: k for k, v in fmt.SAFETENSORS_DTYPES.items()}
    if name not in by_name:
        raise fmt.FormatError(f"unsupported safetensors dtype {name}")
    return by_name[name]


def register() -> None:
    """Make ``cospadi`` known to transformers (idempotent: a second call changes nothing)."""
    existing = AUTO_QUANTIZATION_CONFIG_MAPPING.get(fmt.QUANT_METHOD)
    if existing is not None and existing.__name__ != CoSpaDiHfConfig.__name__:
        raise RuntimeError(f"another quantization config is registered as {fmt.QUANT_METHOD!r}: {existing}")
    AUTO_QUANTIZATION_CONFIG_MAPPING[fmt.QUANT_METHOD] = CoSpaDiHfConfig
    AUTO_QUANTIZER_MAPPING[fmt.QUANT_METHOD] = CoSpaDiHfQuantizer
