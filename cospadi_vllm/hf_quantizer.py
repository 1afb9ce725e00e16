"""CoSpaDi checkpoints in Hugging Face transformers: ``import cospadi_vllm`` and then
``AutoModelForCausalLM.from_pretrained(ckpt)`` loads the compressed layers as they are stored.

transformers' quantizer API (``HfQuantizer``): before the weights are loaded, every linear listed in
``quantization_config.modules`` becomes a :class:`CoSpaDiLinear` holding ``dictionary`` /
``coef_mask`` / ``coef_values`` / ``coef_scales`` (and ``bias``) with their stored dtypes; the loader
then fills them from the safetensors. The forward pass is the vLLM plugin's: the kernel chosen for the
layer's device and dtype (``cospadi_vllm.kernels``: C++ on CPU, Triton on CUDA) — no dense copy of C.
``save_pretrained`` writes the tensors back as stored and the same ``quantization_config``.

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
from cospadi_vllm import safetensors_headers


class CoSpaDiHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a CoSpaDi checkpoint; written back exactly as it was read."""

    def __init__(self, **config: Any) -> None:
        self._config = copy.deepcopy(config)
        parsed = fmt.parse_quantization_config(config)
        self.quant_method = fmt.QUANT_METHOD
        self.modules: dict[str, dict] = parsed["modules"]  # each entry with its own storage types

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class CoSpaDiLinear(torch.nn.Module):
    """y = (x·D)·C + b with C in its stored form. Tensors are buffers: nothing here is trainable.

    ``prepare(dtype)`` picks the kernel for the tensors' device and the activation dtype, once after
    loading and again after a move to another device (or a forward in another dtype); the kernel may
    hold the tensors in its own layout (C repacked on GPUs, D transposed on CPU), and ``state_dict``
    still gives them as stored.
    """

    def __init__(self, in_features: int, out_features: int, k: int, s: int, value_dtype: torch.dtype,
                 bias_dtype: torch.dtype | None, device: torch.device | str = "meta",
                 owns_dictionary: bool = True, dictionary_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        self.owns_dictionary = owns_dictionary
        self.dictionary_dtype = dictionary_dtype
        self.name = ""  # the module's name in its model, for error messages (set when it is placed)
        # A layer of a shared-dictionary group that does not store it uses its owner's buffer (set by
        # ``share_dictionary_of``), held outside the module tree so it is neither saved nor moved twice.
        self._dictionary_owner: list[CoSpaDiLinear] = []
        self.kernel = None
        specs = fmt.LayerShape(in_features, out_features, k, s).tensor_specs(value_dtype, dictionary_dtype)
        for suffix, (shape, dtype) in specs.items():
            if suffix not in fmt.DICTIONARY_SUFFIXES or owns_dictionary:
                self.register_buffer(suffix, torch.empty(shape, dtype=dtype, device=device))
        if bias_dtype is None:
            self.bias = None
        else:
            self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device))
        self.register_buffer("atom_offsets", torch.zeros(out_features, dtype=torch.int32, device=device),
                             persistent=False)

    def __getattr__(self, name: str):
        if name in fmt.DICTIONARY_SUFFIXES and self.__dict__.get("_dictionary_owner"):
            return getattr(self.__dict__["_dictionary_owner"][0], name)
        return super().__getattr__(name)

    def share_dictionary_of(self, owner: CoSpaDiLinear) -> None:
        self._dictionary_owner[:] = [owner]

    def prepare(self, act_dtype: torch.dtype) -> None:
        """Choose the kernel for the current device and ``act_dtype``; let it lay the tensors out."""
        from cospadi_vllm.kernels import KernelConfig, choose_kernel

        self._restore_stored()
        self.kernel = choose_kernel(KernelConfig(self.coef_mask.device, act_dtype, self.coef_values.dtype,
                                                 self.dictionary_dtype, self.name))
        self.kernel.process_weights_after_loading(self, owns_dictionary=self.owns_dictionary)

    def _restore_stored(self) -> None:
        """Undo the previous kernel's layout (a layer sharing a dictionary restores only its own tensors)."""
        if self.kernel is None:
            return
        for suffix, tensor in self.kernel.stored_tensors(self).items():
            if suffix not in fmt.DICTIONARY_SUFFIXES or self.owns_dictionary:
                self._buffers[suffix] = tensor
        self.kernel = None

    def _apply(self, fn, recurse=True):
        # Moving prepared tensors to another device: lay them out again for that device's kernel.
        result = super()._apply(fn, recurse)
        if self.kernel is not None and self.kernel.config.device != self.coef_mask.device:
            self.prepare(self.kernel.config.act_dtype)
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:
            for suffix, tensor in self.kernel.stored_tensors(self).items():
                if suffix not in fmt.DICTIONARY_SUFFIXES or self.owns_dictionary:
                    destination[prefix + suffix] = tensor

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or self.kernel.config.act_dtype != x.dtype:
            self.prepare(x.dtype)
        y = self.kernel.apply(self, x.reshape(-1, x.shape[-1]))
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
        found = safetensors_headers.read_tensor_infos(checkpoint_files) if checkpoint_files else None
        for name, spec in config.modules.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError as err:
                raise fmt.FormatError(f"quantization_config.modules names {name}, which this model does not have") from err
            if not isinstance(linear, torch.nn.Linear):
                raise fmt.FormatError(f"{name} is a {type(linear).__name__}, not a linear layer")
            shape = fmt.LayerShape(linear.in_features, linear.out_features, spec["k"], spec["s"])
            owner = fmt.dictionary_owner(config.modules, name)
            value_dtype, dictionary_dtype = fmt.module_dtypes(spec)
            bias_dtype = linear.bias.dtype if linear.bias is not None else None
            if found is not None:
                problems = fmt.layer_problems(name, found, shape, value_dtype, dictionary_dtype, owner,
                                              fmt.dictionary_users(config.modules, name))
                if problems:
                    raise fmt.FormatError(problems[0])
                bias = found.get(f"{name}.bias")  # keep the bias in its stored dtype
                bias_dtype = bias[0] if bias is not None else None
                if isinstance(bias_dtype, str):
                    raise fmt.FormatError(f"tensor {name}.bias has unsupported safetensors dtype {bias_dtype}")
            module = CoSpaDiLinear(linear.in_features, linear.out_features, spec["k"], spec["s"], value_dtype,
                                   bias_dtype, owns_dictionary=owner == name, dictionary_dtype=dictionary_dtype)
            module.name = name
            model.set_submodule(name, module)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config: CoSpaDiHfConfig = self.quantization_config
        for name, module in model.named_modules():  # model order: a dictionary's owner comes first
            if not isinstance(module, CoSpaDiLinear):
                continue
            owner = fmt.dictionary_owner(config.modules, name)
            if owner != name:
                module.share_dictionary_of(model.get_submodule(owner))
            shape = fmt.LayerShape(module.in_features, module.out_features, module.k, module.s)
            value_dtype, dictionary_dtype = fmt.module_dtypes(config.modules[name])
            suffixes = (*shape.tensor_specs(value_dtype, dictionary_dtype),
                        *(("bias",) if module.bias is not None else ()))
            loaded = {f"{owner if suffix in fmt.DICTIONARY_SUFFIXES else name}.{suffix}": getattr(module, suffix)
                      for suffix in suffixes}
            for tensor_name, tensor in loaded.items():
                if tensor.is_meta or not getattr(tensor, "_is_hf_initialized", True):
                    raise fmt.FormatError(fmt.missing_tensor(tensor_name))
            found = {tensor_name: (t.dtype, tuple(t.shape)) for tensor_name, t in loaded.items()}
            problems = fmt.layer_problems(name, found, shape, value_dtype, dictionary_dtype, owner)
            if problems:
                raise fmt.FormatError(problems[0])
            fmt.check_mask_bits(name, module.coef_mask, module.k, module.s)
            module.atom_offsets = torch.zeros(module.out_features, dtype=torch.int32, device=module.coef_mask.device)
        for module in model.modules():  # once every tensor is checked as stored: owners before their users
            if isinstance(module, CoSpaDiLinear):
                module.prepare(model.dtype)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make ``cospadi`` known to transformers (idempotent: a second call changes nothing)."""
    existing = AUTO_QUANTIZATION_CONFIG_MAPPING.get(fmt.QUANT_METHOD)
    if existing is not None and existing.__name__ != CoSpaDiHfConfig.__name__:
        raise RuntimeError(f"another quantization config is registered as {fmt.QUANT_METHOD!r}: {existing}")
    AUTO_QUANTIZATION_CONFIG_MAPPING[fmt.QUANT_METHOD] = CoSpaDiHfConfig
    AUTO_QUANTIZER_MAPPING[fmt.QUANT_METHOD] = CoSpaDiHfQuantizer
