"""A LoRA adapter's weights: one ``A`` (``rank × in``) and ``B`` (``out × rank``) per target
module of every decoder layer, float32, saved and loaded in peft's on-disk format.

On disk an adapter is a directory with ``adapter_config.json`` (peft's fields, see
:meth:`LoraConfig.to_peft`) and ``adapter_model.safetensors`` whose keys are peft's:
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``. Only safetensors is read
or written: a pickled ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference_node.lora.config import (
    TARGET_MODULES,
    LoraConfig,
    module_path,
)
from inference_node.model_types import LanguageModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 64 * 1024
_KEY = re.compile(
    r"base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight"
)


class AdapterFormatError(ValueError):
    """An adapter directory that is not a valid LoRA adapter for this implementation."""


@dataclass(frozen=True)
class LoraPair:
    """One target module's factors: ``delta(x) = scaling * B @ (A @ x)``."""

    a: torch.Tensor
    """``[rank, in_features]``."""
    b: torch.Tensor
    """``[out_features, rank]``."""


def target_shapes(lm: LanguageModel, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every module ``config`` targets in ``lm``, by module
    path (:func:`module_path`), read from the base weights."""
    layers = int(lm.config["num_hidden_layers"])
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(layers):
        for module in config.target_modules:
            path = module_path(layer, module)
            out_features, in_features = lm.weights[f"{path}.weight"].shape
            shapes[path] = (int(out_features), int(in_features))
    return shapes


class LoraAdapter:
    """The weights of one LoRA adapter, keyed by base module path (``model.layers.0.mlp.up_proj``).

    Tensors are float32 and owned by the adapter; a trainer makes them require gradients with
    :meth:`requires_grad_` and optimises :meth:`parameters`.
    """

    def __init__(self, config: LoraConfig, pairs: Mapping[str, LoraPair]) -> None:
        self.config = config
        self.pairs: dict[str, LoraPair] = dict(pairs)
        self.num_layers = _check_pairs(config, self.pairs)

    @classmethod
    def initialized(
        cls,
        config: LoraConfig,
        shapes: Mapping[str, tuple[int, int]],
        *,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> LoraAdapter:
        """A fresh adapter initialised as peft does: ``A`` Kaiming-uniform with
        ``a=sqrt(5)`` (``U(-1/sqrt(in), 1/sqrt(in))``), ``B`` zeros, so the adapted model starts
        equal to the base. ``A`` is drawn on the CPU from a generator seeded with ``seed``, in
        layer then module order, so the same seed gives the same adapter on any device."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pairs: dict[str, LoraPair] = {}
        for path in sorted(shapes, key=_path_order):
            out_features, in_features = shapes[path]
            a = torch.empty(config.rank, in_features, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            b = torch.zeros(out_features, config.rank, dtype=torch.float32)
            pairs[path] = LoraPair(a=a.to(device), b=b.to(device))
        return cls(config, pairs)

    @classmethod
    def for_model(cls, lm: LanguageModel, config: LoraConfig, *, seed: int) -> LoraAdapter:
        """:meth:`initialized` for ``lm``'s shapes, on ``lm``'s device."""
        return cls.initialized(config, target_shapes(lm, config), seed=seed, device=lm.device)

    def pair(self, path: str) -> LoraPair | None:
        """The factors of base module ``path``, ``None`` if it is not adapted."""
        return self.pairs.get(path)

    def parameters(self) -> Iterator[torch.Tensor]:
        """Every ``A`` and ``B``, in layer then module order (``A`` before ``B``)."""
        for path in sorted(self.pairs, key=_path_order):
            yield self.pairs[path].a
            yield self.pairs[path].b

    def requires_grad_(self, requires_grad: bool = True) -> LoraAdapter:
        """Set ``requires_grad`` on every factor; returns ``self``."""
        for tensor in self.parameters():
            tensor.requires_grad_(requires_grad)
        return self

    def nbytes(self) -> int:
        """Bytes held by the factors (gradients and optimizer state not included)."""
        return sum(t.numel() * t.element_size() for t in self.parameters())

    def compatibility_error(self, shapes: Mapping[str, tuple[int, int]]) -> str | None:
        """Why this adapter cannot be applied to a base model whose targetable modules have
        ``shapes`` (from :func:`target_shapes`), or ``None`` if it can."""
        for path, pair in self.pairs.items():
            expected = shapes.get(path)
            if expected is None:
                return f"the base model has no module {path}"
            found = (pair.b.shape[0], pair.a.shape[1])
            if found != expected:
                return f"{path} is {found[0]}×{found[1]} in the adapter, {expected} in the model"
        if len(shapes) != len(self.pairs):
            return f"the adapter covers {len(self.pairs)} modules, the model has {len(shapes)}"
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The factors under peft's saved names (contiguous float32 copies on the CPU)."""
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(self.pairs, key=_path_order):
            for letter, tensor in (("A", self.pairs[path].a), ("B", self.pairs[path].b)):
                cpu = tensor.detach().to("cpu", torch.float32).contiguous()
                tensors[f"{PEFT_PREFIX}{path}.lora_{letter}.weight"] = cpu
        return tensors

    def save(self, directory: Path, *, base_model: str | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``
        (created if needed), in the layout ``peft.PeftModel.from_pretrained`` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        text = json.dumps(self.config.to_peft(base_model), indent=2, sort_keys=True)
        (directory / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, *, device: torch.device | str = "cpu") -> LoraAdapter:
        """An adapter saved by :meth:`save` or by peft's ``save_pretrained`` (safetensors).

        Raises :class:`AdapterFormatError` for a missing file, a pickle-only adapter, keys or
        shapes that do not form a complete adapter of the configured rank and targets, or
        non-finite values;
        :class:`~inference_node.lora.config.AdapterConfigError` for unsupported peft settings.
        """
        directory = Path(directory)
        config = LoraConfig.from_peft(_read_config(directory / CONFIG_FILE))
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            note = ""
            if (directory / "adapter_model.bin").exists():
                note = " (adapter_model.bin is a pickle, which is never loaded)"
            raise AdapterFormatError(f"no {WEIGHTS_FILE} in {directory}{note}")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(weights), framework="pt", device="cpu") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                match = _KEY.fullmatch(key)
                if match is None or match.group(3) not in config.target_modules:
                    raise AdapterFormatError(f"unexpected tensor {key!r} in {weights}")
                tensor = file.get_tensor(key)
                if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                    raise AdapterFormatError(f"{key} is not a finite floating-point tensor")
                factors.setdefault(match.group(1), {})[match.group(4)] = tensor.float()
        pairs = {}
        for path, ab in factors.items():
            if set(ab) != {"A", "B"}:
                raise AdapterFormatError(f"{path} has lora_{''.join(ab)} only")
            pairs[path] = LoraPair(a=ab["A"].to(device), b=ab["B"].to(device))
        try:
            return cls(config, pairs)
        except ValueError as exc:
            raise AdapterFormatError(f"{directory}: {exc}") from exc


def _read_config(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise AdapterFormatError(f"no {CONFIG_FILE} at {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{path} is over {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} is not a JSON object")
    return data


def _path_order(path: str) -> tuple[int, int]:
    """Sort key of a module path: layer, then :data:`TARGET_MODULES` order."""
    parts = path.split(".")
    return int(parts[2]), TARGET_MODULES.index(parts[4])


def _check_pairs(config: LoraConfig, pairs: Mapping[str, LoraPair]) -> int:
    """The number of layers ``pairs`` covers; ``ValueError`` unless every layer ``0..n-1`` has
    exactly ``config``'s targets, with 2-D float32 factors of ``config.rank``."""
    layers = {int(path.split(".")[2]) for path in pairs if path.startswith("model.layers.")}
    count = max(layers, default=-1) + 1
    expected = {module_path(i, m) for i in range(count) for m in config.target_modules}
    if not pairs or set(pairs) != expected:
        missing = sorted(expected - set(pairs))[:3]
        extra = sorted(set(pairs) - expected)[:3]
        raise ValueError(f"modules do not match the config: missing {missing}, extra {extra}")
    for path, pair in pairs.items():
        if pair.a.dim() != 2 or pair.b.dim() != 2:
            raise ValueError(f"{path}: A and B must be matrices")
        if pair.a.dtype != torch.float32 or pair.b.dtype != torch.float32:
            raise ValueError(f"{path}: A and B must be float32")
        if pair.a.shape[0] != config.rank or pair.b.shape[1] != config.rank:
            raise ValueError(
                f"{path}: A {tuple(pair.a.shape)} and B {tuple(pair.b.shape)} "
                f"do not have rank {config.rank}"
            )
    return count
