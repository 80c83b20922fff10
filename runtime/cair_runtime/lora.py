"""LoRA adapters without torch: read a safetensors file, compute the fused weights in numpy, and
say which graph initializer each one replaces.

A LoRA on a weight ``W`` (out x in[, kh, kw]) adds ``scale * (alpha / rank) * up @ down``
(peft's ``LoraLayer.get_delta_weight``). The exporter records in the
manifest's ``lora.targets`` where each model weight lives in each graph: the initializer, its
layout (``same``, or ``transposed`` for the TorchScript exporter's MatMul weights) and its bytes in a
weights file. The fidelity graph has no cross-attention K/V/Q/out weights (``attn2``): their
deltas act through the caches planning computes.

Key layouts read here: peft/diffusers (``unet.<module>.lora_A.weight`` / ``lora_B``, the older
``lora.down``/``lora.up``, ``lora_linear_layer`` and ``processor.to_q_lora``), and kohya
(``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``, ``lora_te_``,
``lora_te1_``, ``lora_te2_``) where the module names are diffusers'. Anything else (SDXL kohya files
in the original LDM naming, DoRA, rsLoRA, per-module alpha patterns) is refused with a message:
``cair-export export --lora`` fuses those through diffusers' own loader.
"""

from __future__ import annotations

import errno
import json
import re
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from cair_runtime.checks import is_finite_number
from cair_runtime.errors import InvalidInputError
from cair_runtime.manifest import sha256_file as file_sha256

LORA_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Which model a key prefix names; the unet feeds both UNet graphs.
MODEL_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
LAYOUTS = ("same", "transposed")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _error(message: str) -> InvalidInputError:
    return InvalidInputError(message, field="loras")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` (the CLIs' ``--lora``) -> (path, scale); the scale defaults to 1."""
    path, _, scale = text.rpartition(":")
    if path and scale:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def check_lora_list(loras: Any) -> list[tuple[Path, float]]:
    """``[(path, scale), ...]`` (or bare paths, scale 1) checked: safetensors files, finite scales."""
    if loras is None:
        return []
    if isinstance(loras, (str, Path)) or not isinstance(loras, Sequence):
        raise _error(f"loras {loras!r} must be a list of (path, scale) pairs")
    checked = []
    for entry in loras:
        path, scale = (entry, 1.0) if isinstance(entry, (str, Path)) else tuple(entry) if \
            isinstance(entry, Sequence) and len(entry) == 2 else (None, None)
        if path is None:
            raise _error(f"LoRA entry {entry!r} must be a path or a (path, scale) pair")
        if not is_finite_number(scale):
            raise _error(f"LoRA scale {scale!r} for {path} must be a finite number")
        checked.append((check_lora_file(path), float(scale)))
    return checked


def check_lora_file(path: str | Path) -> Path:
    """A readable safetensors file; pickles (.bin, .pt, .ckpt) are refused, never opened."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _error(f"LoRA {path} is a pickle file ({path.suffix}); only .safetensors adapters are read (a pickle "
                     "can run code); convert it in a trusted environment")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise _error(f"LoRA {path} is not a .safetensors file; give a safetensors adapter")
    try:
        mode = path.stat().st_mode  # follows links: a loop fails here with ELOOP
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise _error(f"LoRA file {path} does not exist") from None
        reason = "a symbolic link loop" if error.errno == errno.ELOOP else error.strerror or type(error).__name__
        raise _error(f"LoRA file {path} cannot be read: {reason}") from None
    if stat.S_ISDIR(mode):
        raise _error(f"LoRA {path} is a folder; give the adapter's .safetensors file inside it")
    if not stat.S_ISREG(mode):
        raise _error(f"LoRA {path} is not a regular file (a pipe, device or socket); give a .safetensors file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= size <= path.stat().st_size - 8 or handle.read(1) != b"{":
                raise ValueError
    except (OSError, ValueError):
        raise _error(f"LoRA file {path} is not a safetensors file (no valid header)") from None
    return path


# safetensors dtype -> numpy dtype of its bytes; BF16 is read as its 16 bits and widened (numpy has no bfloat16).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1"}


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is float32's upper half: shift its 16 bits into place (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_lora_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (as float32) and header metadata of a safetensors file; every value finite, or refused.

    Reads the format itself (an 8-byte header length, a JSON header, the tensors' bytes), so that
    bfloat16 files, common for adapters, are read exactly and a truncated or inconsistent file is
    one error naming what is wrong.
    """
    def refuse(reason: str) -> InvalidInputError:
        return _error(f"cannot read LoRA {path}: {reason}; the file is truncated or not a safetensors adapter")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= size - 8:
            raise refuse(f"its header claims {length} bytes of a {size}-byte file")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            raise refuse("its header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise refuse("its __metadata__ is not an object")
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + length else np.zeros(0, np.uint8)
    start = 8 + length
    tensors = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"]), entry["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
            valid = all(type(n) is int and n >= 0 for n in (*shape, begin, end)) and end - begin == count * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise refuse(f"tensor {key!r} has dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}; "
                         f"expected one of {', '.join(_DTYPES)} with a shape and data offsets") from None
        if not valid or start + end > size:
            raise refuse(f"tensor {key!r} ({entry['dtype']} {list(shape)}) lies at bytes {begin}..{end} of a data "
                         f"section of {size - start}")
        raw = data[start + begin:start + end].view(dtype).reshape(shape)
        value = _bfloat16_to_float32(raw) if entry["dtype"] == "BF16" else raw.astype(np.float32)
        if not np.isfinite(value).all():
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise _error(f"LoRA {path.name} tensor {key!r} holds {bad} NaN or infinite values (of {value.size}, "
                         "as float32); the adapter is broken: fix or replace the file")
        tensors[key] = value
    return tensors, {str(k): str(v) for k, v in metadata.items()}


# --- which module each key names ---------------------------------------------------------------

_PEFT = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                   r"lora_linear_layer\.up)(?:\.[A-Za-z0-9_]+)?\.weight$")
_PART = {"lora_A": "down", "lora.down": "down", "lora_linear_layer.down": "down",
         "lora_B": "up", "lora.up": "up", "lora_linear_layer.up": "up"}
_PROCESSOR = re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_KOHYA = re.compile(r"^(?P<prefix>lora_unet_|lora_te1_|lora_te2_|lora_te_)(?P<name>[A-Za-z0-9_]+?)"
                    r"\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class _Module:
    """One adapted module of one model: its down/up factors and alpha."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None


def _split_model(key: str) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    return (MODEL_PREFIXES[head], rest) if head in MODEL_PREFIXES and rest else ("unet", key)


def _group_modules(path: Path, tensors: Mapping[str, np.ndarray], kohya_names: Mapping[str, Mapping[str, str]]
                   ) -> dict[tuple[str, str], _Module]:
    """(model, module path) -> its factors; kohya names resolve against the model's known modules."""
    modules: dict[tuple[str, str], _Module] = {}
    for key, value in tensors.items():
        match = _KOHYA.match(key)
        if match:
            model = KOHYA_PREFIXES[match["prefix"]]
            module = kohya_names.get(model, {}).get(match["name"])
            if module is None:
                raise _error(f"LoRA {path.name} key {key!r} names no weight of this engine's {model} (kohya names "
                             "are resolved against diffusers' module names; SDXL files in the original LDM naming "
                             "need `cair-export export --lora`)")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[match["part"]]
        elif (match := _PROCESSOR.match(key)):
            model, prefix = _split_model(match["module"])
            module = f"{prefix}.{match['proj']}" + (".0" if match["proj"] == "to_out" else "")
            part = match["part"]
        elif (match := _PEFT.match(key)):
            model, module = _split_model(match["module"])
            part = _PART[match["part"]]
        elif key.endswith(".alpha"):
            model, module = _split_model(key[:-len(".alpha")])
            part = "alpha"
        elif "magnitude" in key:
            raise _error(f"LoRA {path.name} is a DoRA adapter ({key}); run-time swapping supports plain LoRA; "
                         "fuse it with `cair-export export --lora`")
        else:
            raise _error(f"LoRA {path.name} key {key!r} is not a LoRA key this runtime reads (peft/diffusers or "
                         "kohya layouts)")
        entry = modules.setdefault((model, module), _Module())
        if part == "alpha":
            if value.size != 1 or not np.isfinite(value).all():
                raise _error(f"LoRA {path.name} alpha of {module} is {value!r}; expected one finite number")
            entry.alpha = float(value.reshape(-1)[0])
        else:
            setattr(entry, part, value)
    return modules


def _adapter_alphas(path: Path, metadata: Mapping[str, str]) -> dict[str, float | None]:
    """Per model, the alpha diffusers' ``lora_adapter_metadata`` gives (None: alpha = rank, diffusers' default)."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        raise _error(f"LoRA {path.name} has unreadable lora_adapter_metadata") from None
    alphas: dict[str, float | None] = {}
    for model in MODEL_PREFIXES.values():
        get = lambda name, model=model: config.get(f"{model}.{name}")  # noqa: E731
        if get("use_dora") or get("use_rslora") or get("alpha_pattern") or get("rank_pattern"):
            raise _error(f"LoRA {path.name} uses DoRA, rsLoRA or per-module rank/alpha patterns for its {model}; "
                         "run-time swapping reads plain LoRA; fuse it with `cair-export export --lora`")
        if get("lora_alpha") is not None:
            if not is_finite_number(get("lora_alpha")):
                raise _error(f"LoRA {path.name} {model}.lora_alpha {get('lora_alpha')!r} is not a finite number")
            alphas[model] = float(get("lora_alpha"))
    return alphas


def lora_delta(down: np.ndarray, up: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``up @ down`` in ``shape`` (linear: (out, in); conv: (out, in, kh, kw) with a 1x1 ``up``)."""
    rank = down.shape[0]
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape)


# --- the engine's side: targets and overrides ---------------------------------------------------


@dataclass(frozen=True)
class WeightSite:
    """Where one model weight lives in one graph."""

    kind: str  # graph kind
    initializer: str
    layout: str  # "same" | "transposed"
    file: str  # weights file (relative to the engine folder) holding the base bytes
    offset: int
    shape: tuple[int, ...]  # the initializer's shape


@dataclass
class LoraTargets:
    """The manifest's ``lora.targets``, indexed by model weight."""

    sites: dict[tuple[str, str], list[WeightSite]] = field(default_factory=dict)  # (model, weight) -> sites
    unmapped: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (model, weight) -> graph kinds

    @classmethod
    def from_manifest(cls, record: Mapping[str, Any] | None) -> LoraTargets:
        targets = cls()
        for kind, graph in ((record or {}).get("targets") or {}).items():
            model = graph["model"]
            for weight, entries in graph["weights"].items():
                for initializer, layout, offset, dtype, shape in entries:
                    targets.sites.setdefault((model, weight), []).append(
                        WeightSite(kind, initializer, layout, graph["file"], int(offset), tuple(shape)))
            for weight in graph.get("unmapped", ()):
                targets.unmapped.setdefault((model, weight), []).append(kind)
        return targets

    def kohya_names(self) -> dict[str, dict[str, str]]:
        """Per model, kohya's underscore form of each module -> its diffusers module path."""
        names: dict[str, dict[str, str]] = {}
        for model, weight in [*self.sites, *self.unmapped]:
            module = weight.removesuffix(".weight")
            names.setdefault(model, {})[module.replace(".", "_")] = module
            if model != "unet":  # files name CLIP's modules under text_model. (transformers < 5 nesting)
                names[model]["text_model_" + module.replace(".", "_")] = module
        return names

    def canonical(self, model: str, module: str) -> str:
        """``module`` as the manifest names it: CLIP's ``text_model.`` nesting dropped where the export has none."""
        if model != "unet" and module.startswith("text_model.") \
                and (model, f"{module}.weight") not in self.sites and (model, f"{module}.weight") not in self.unmapped:
            return module[len("text_model."):]
        return module


@dataclass(frozen=True)
class LoraSet:
    """Adapters resolved against one engine: the initializers they replace, ready to swap in."""

    key: tuple[tuple[str, float], ...]  # (sha256, scale) per adapter, in order; () is the base weights
    overrides: dict[str, dict[str, np.ndarray]]  # graph kind -> initializer -> fused weight
    adapters: tuple[dict[str, Any], ...] = ()  # file name, sha256, scale: for reports and PNG metadata


BASE = LoraSet((), {})


def resolve_loras(folder: str | Path, manifest_lora: Mapping[str, Any] | None, weight_dtype: str,
                  loras: Sequence[tuple[Path, float]]) -> LoraSet:
    """Check every adapter against the engine and compute the fused initializers; nothing is applied.

    Every key must name a weight the engine records, ranks and shapes must agree, and a weight a
    graph uses but whose initializer the exporter could not identify is refused, so an adapter is
    either applied whole or not at all.
    """
    if not loras:
        return BASE
    if weight_dtype != "float32":
        raise _error(f"run-time LoRA needs an fp32 export (this one computes in {weight_dtype}); export with "
                     "--lora FILE to fuse the adapter instead")
    if not manifest_lora or not manifest_lora.get("targets"):
        raise _error("this engine folder records no weight map for adapters (exported before run-time LoRA); "
                     "re-export it with this cair-export")
    targets = LoraTargets.from_manifest(manifest_lora)
    kohya = targets.kohya_names()
    deltas: dict[tuple[str, str], np.ndarray] = {}
    adapters = []
    for path, scale in loras:
        tensors, metadata = read_lora_file(path)
        if not tensors:
            raise _error(f"LoRA {path.name} holds no tensors")
        alphas = _adapter_alphas(path, metadata)
        for (model, module), parts in sorted(_group_modules(path, tensors, kohya).items()):
            module = targets.canonical(model, module)
            weight = f"{module}.weight"
            where = f"LoRA {path.name}: {model} {module}"
            if (model, weight) in targets.unmapped:
                raise _error(f"{where} is used by the {', '.join(targets.unmapped[model, weight])} graph(s) but the "
                             "export could not locate its initializer; fuse it with `cair-export export --lora`")
            sites = targets.sites.get((model, weight))
            if sites is None:
                raise _error(f"{where} is not a weight of this engine's {model} (keys do not match the model)")
            if parts.down is None or parts.up is None:
                raise _error(f"{where} lacks its {'down (lora_A)' if parts.down is None else 'up (lora_B)'} matrix")
            shape = sites[0].shape if sites[0].layout == "same" else sites[0].shape[::-1]
            rank = parts.down.shape[0]
            if parts.up.ndim < 2 or parts.up.shape[1] != rank or int(np.prod(parts.up.shape[2:])) != 1:
                raise _error(f"{where} has rank {rank} in its down matrix {parts.down.shape} but up matrix "
                             f"{parts.up.shape}; the ranks must agree")
            if parts.up.shape[0] != shape[0] or int(np.prod(parts.down.shape[1:])) != int(np.prod(shape[1:])):
                raise _error(f"{where} has up {parts.up.shape} x down {parts.down.shape}, which does not make the "
                             f"weight's shape {shape}")
            alpha = parts.alpha if parts.alpha is not None else alphas.get(model, float(rank))
            factor = scale * alpha / rank
            if not abs(factor) <= _FLOAT32_MAX:
                raise _error(f"{where}: scale {scale:g} x alpha {alpha:g} / rank {rank} = {factor:g} is beyond "
                             "float32's range; use a smaller scale (or fix the adapter's alpha)")
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, with its name
                delta = np.float32(factor) * lora_delta(parts.down, parts.up, shape)
            deltas[model, weight] = deltas[model, weight] + delta if (model, weight) in deltas else delta
        adapters.append({"file": path.name, "sha256": file_sha256(path), "scale": scale})
    overrides: dict[str, dict[str, np.ndarray]] = {}
    maps: dict[str, np.memmap] = {}
    for (model, weight), delta in deltas.items():
        for site in targets.sites[model, weight]:
            if site.file not in maps:
                maps[site.file] = np.memmap(Path(folder) / site.file, dtype=np.uint8, mode="r")
            count = int(np.prod(site.shape))
            base = maps[site.file][site.offset:site.offset + 4 * count].view(np.float32).reshape(site.shape)
            change = delta if site.layout == "same" else delta.T
            with np.errstate(over="ignore", invalid="ignore"):
                fused = np.ascontiguousarray(base + change)
            if not np.isfinite(fused).all():
                raise _error(f"the adapters' fused {model} weight {weight} overflows float32 "
                             f"({int(np.count_nonzero(~np.isfinite(fused)))} NaN or infinite values): their values or "
                             "scales are too large; use smaller scales")
            overrides.setdefault(site.kind, {})[site.initializer] = fused
    key = tuple((a["sha256"], a["scale"]) for a in adapters)
    return LoraSet(key, overrides, tuple(adapters))


class AdapterSwitch:
    """Which adapters an engine's weights hold now; a call that needs another set waits for the
    calls in flight to finish, then the weights are swapped (by every registered ``apply``).

    Calls that need the set in place run concurrently; two sets never run at once. ``apply``
    receives graph kind -> initializer -> array (empty: the base weights) and rebuilds what uses
    them; it runs while no call is in flight.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._active: tuple | None = ()  # key of the applied set; None: unknown after a failed swap
        self._running = 0
        self._appliers: list[Callable[[dict[str, dict[str, np.ndarray]]], None]] = []
        self.last_swap_s = 0.0  # seconds the last swap took

    def register(self, apply: Callable[[dict[str, dict[str, np.ndarray]]], None]) -> None:
        with self._condition:
            self._appliers.append(apply)

    @property
    def active(self) -> tuple | None:
        return self._active

    @contextmanager
    def using(self, lora_set: LoraSet) -> Iterator[None]:
        import time

        with self._condition:
            while lora_set.key != self._active and self._running:
                self._condition.wait()
            if lora_set.key != self._active:
                started = time.perf_counter()
                self._active = None
                for apply in self._appliers:
                    apply(lora_set.overrides)
                self._active = lora_set.key
                self.last_swap_s = time.perf_counter() - started
            self._running += 1
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()
