"""Finding a checkpoint and loading its safetensors into MoEDecoder (resident: all layers in memory).

A source is a local directory or a Hugging Face hub id. Only config,
tokenizer and safetensors files are ever fetched; pickle-based weights
(.bin, .pt) are refused and no code from a checkpoint is run.

Loading is strict and streaming: every expected tensor is checked by name and
shape from the safetensors headers first, then the model is built on the
meta device and materialised one decoder layer at a time, so two full copies
of the weights never exist at once. Tensors are read with pread into memory
of their own rather than memory-mapped: mapped shard pages would count in the
process's resident memory on top of the converted weights.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import sys
import threading
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..decoder.model import MoEDecoder
from ..errors import CheckpointError, ModelNotFoundError
from ..families import name_map_groups, read_config, with_checkpoint_layout
from ..families.names import Deinterleaved, Mxfp4, NameMap, Recipe, Stack, Tensor, Transposed, integer_leaves, leaves, shape_of
from ..kernels import pack_weight, packing_available, quantize_block_, use_kernels
from ..kernels.int8 import integer_path, integer_reason, pack_block_
from ..kernels.precision import resolve_device, resolve_dtype
from .memory import Mode, format_bytes, memory_available, modes_that_fit, refusal, resident_need
from .prepared import DamagedCacheError, PreparedCache
from .shards import INDEX_FILE, shard_files  # noqa: F401  (importable here as before)

STORED_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
WEIGHT_DTYPES = ("F32", "BF16", "F16", "F64")  # what a weight of a released checkpoint may be stored as
STORED_SIZES = {code: torch.empty(0, dtype=dtype).element_size() for code, dtype in STORED_DTYPES.items()}
# Buffers some LLaMA-style checkpoints carry that are not weights: recomputed, so ignored when present.
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq",)
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # the decoder layer a tensor name belongs to
# What a hub download fetches: enough to build the model and its tokenizer, nothing executable.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    INDEX_FILE,
]


def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint directory for `source`, downloading from the hub when it is an id."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith("/"):
        raise CheckpointError(f"{text}: no such directory, and not a hub id of the form 'owner/name'")
    if path.parent.is_dir():  # demo-checkpoints/nope: a mistyped local path, not a hub id to download
        found = sorted(p.name for p in path.parent.iterdir() if (p / "config.json").is_file())
        hint = f" (checkpoints there: {', '.join(found)})" if found else ""
        raise CheckpointError(f"{text}: no such directory in {path.parent}{hint}")
    return _download(text)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repository, gated, network errors: all end here
        raise ModelNotFoundError(
            f"could not get '{repo_id}' from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Without network, download it elsewhere (huggingface-cli download {repo_id} "
            f"--include '*.json' '*.safetensors') and pass that local directory instead"
        ) from exc


class ShardReader:
    """Header-level view of all shards: which tensor lives where, with what shape."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.spans: dict[str, tuple[str, int, int]] = {}  # stored dtype, first byte and end in the file
        for file in files:
            _check_readable(file)  # unreadable (permissions) is told apart from corrupt
            with _open(file):  # safetensors checks the header against the file (offsets, sizes) or raises
                pass
            for name, (code, shape, start, end) in _read_header(file).items():
                if name in self.location:
                    raise CheckpointError(
                        f"tensor {name} is stored twice, in {self.location[name].name} and {file.name}; "
                        "the shards do not belong together, re-download the checkpoint"
                    )
                self.location[name] = file
                self.shapes[name] = shape
                self.spans[name] = (code, start, end)

    def element_size(self, name: str) -> int:
        """Bytes per element of tensor `name` as stored."""
        return STORED_SIZES.get(self.spans[name][0], 4)

    def check(self, expected: dict[str, tuple[int, ...]], as_bytes: set[str] = frozenset()) -> None:
        """Raise one CheckpointError listing every missing, unexpected and wrongly shaped tensor.
        as_bytes: the tensors that must be stored as bytes (U8: MXFP4 blocks and scales), not floats."""
        missing = sorted(set(expected) - set(self.shapes))
        unexpected = sorted(n for n in set(self.shapes) - set(expected) if not n.endswith(RECOMPUTED_BUFFERS))
        wrong = sorted(
            f"{n} (checkpoint {list(self.shapes[n])}, expected {list(s)})"
            for n, s in expected.items()
            if n in self.shapes and self.shapes[n] != tuple(s)
        )
        # A weight is a float tensor: an integer one would be converted silently into nonsense.
        not_float = sorted(f"{n} ({self.spans[n][0]})" for n in expected
                           if n in self.spans and n not in as_bytes and self.spans[n][0] not in WEIGHT_DTYPES)
        not_bytes = sorted(f"{n} ({self.spans[n][0]})" for n in as_bytes if n in self.spans and self.spans[n][0] != "U8")
        problems = [
            _listing("missing tensors", missing),
            _listing("unexpected tensors", unexpected),
            _listing("wrongly shaped tensors", wrong),
        ]
        problems = [p for p in problems if p]
        if problems:
            raise CheckpointError(
                f"checkpoint does not match its config.json: {'; '.join(problems)}. "
                "Check that config.json belongs to these weights"
            )
        if not_bytes:
            raise CheckpointError(f"{_listing('MXFP4 tensors not stored as bytes (U8)', not_bytes)}: the checkpoint is damaged or not a released one")
        if not_float:
            label = f"weights not stored as floats ({', '.join(WEIGHT_DTYPES)})"
            raise CheckpointError(
                f"{_listing(label, not_float)}: a weight converted from integers would be nonsense; "
                "the checkpoint is damaged or not a released one"
            )

    def reading(self) -> "_OpenShards":
        return _OpenShards(self)


def _read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype code, shape, start, end), bytes counted from the file's start, from the safetensors header.

    The format: 8 bytes little-endian header length, the JSON header, then the
    data, each tensor's "data_offsets" counting from the data's start.
    """
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    base = 8 + header_len
    return {
        name: (entry["dtype"], tuple(entry["shape"]), base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


class _OpenShards:
    """Shards opened for one loading step and closed after it."""

    def __init__(self, reader: ShardReader):
        self.reader = reader
        self.stack = ExitStack()
        self.handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored, in memory of its own (not a view of a mapped file)."""
        file = self.reader.location[name]
        code, start, end = self.reader.spans[name]
        if code not in STORED_DTYPES or sys.byteorder != "little":  # safetensors stores little-endian
            try:
                with _open(file) as handle:
                    return handle.get_tensor(name).clone()  # its own memory, not the mapping's
            except SafetensorError as exc:
                raise CheckpointError(f"{file}: cannot read tensor {name} ({exc}); the file is corrupt, re-download it") from exc
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(_open_data(file))
        data = _read_bytes(self.handles[file], file, name, start, end)
        return data.view(STORED_DTYPES[code]).reshape(self.reader.shapes[name])


def _open_data(file: Path):
    try:
        return open(file, "rb", buffering=0)
    except OSError as exc:
        raise _unreadable(file, exc) from exc


def _check_readable(file: Path) -> None:
    try:
        open(file, "rb").close()
    except OSError as exc:
        raise _unreadable(file, exc) from exc


def _unreadable(file: Path, exc: OSError) -> CheckpointError:
    return CheckpointError(f"{file}: cannot open it ({exc.strerror}); check the file's permissions")


def _read_bytes(handle, file: Path, name: str, start: int, end: int) -> torch.Tensor:
    """Bytes start:end of an open file into a new uint8 tensor, with pread (no shared file position)."""
    data = torch.empty(end - start, dtype=torch.uint8)
    view, done = memoryview(data.numpy()), 0
    while done < len(view):
        got = os.preadv(handle.fileno(), [view[done:]], start + done)
        if got == 0:
            raise CheckpointError(f"{file}: cannot read tensor {name}: the file ends early; it is truncated, re-download it")
        done += got
    return data


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); it may be truncated or corrupt, re-download it") from exc


def _listing(label: str, names: list[str], limit: int = 12) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {label}: {shown}{more}"


def expected_shapes(groups: Iterable[NameMap]) -> dict[str, tuple[int, ...]]:
    return {leaf.name: leaf.shape for group in groups for recipe in group.values() for leaf in leaves(recipe)}


def load_model(
    source: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    *,
    int8: bool = False,
    lm_head: bool = True,
    packed: bool = False,
    memory_limit: str | int | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    prepared_cache: bool = True,
) -> MoEDecoder:
    """Load a supported MoE checkpoint (local directory or hub id) as an MoEDecoder in eval mode.

    dtype: the compute dtype; weights stored in another dtype are converted
    layer by layer as they are read. int8: keep attention and expert matrices
    as int8 with per-channel scales (kernels/int8.py). lm_head=False skips the output
    matrix, which embeddings never use. packed: float32 matrices in oneDNN's
    blocked layout for faster CPU inference (kernels/onednn.py); the routed experts
    are then one packed matrix each instead of stacked tensors.
    The default stays float32, the reference; dtype="auto" picks bf16 where it is native
    (kernels/precision.py). Before any weight is read, the bytes this needs are compared with
    what the process may use (loading/memory.py; memory_limit replaces that figure):
    InsufficientMemoryError names the modes that fit.
    With int8, the quantized layers are kept in a prepared cache (loading/prepared.py; cache_dir: where,
    prepared_cache=False: neither read nor written) and memory-mapped from it at the next load;
    model.prepared says what happened. On the CPU they run on the integer path where it was chosen
    (kernels/int8.py `integer_path`); model.int8_kernel says which.
    """
    device = resolve_device(device)
    dtype, dtype_reason = resolve_dtype(dtype, device)
    check_int8(dtype, int8)
    check_packing(packed, dtype, int8)
    if packed and device.type != "cpu":
        raise CheckpointError("packed=True is oneDNN's CPU layout; load with packed=False on a CUDA device")
    directory, args, reader, groups = checked_checkpoint(source, lm_head)
    available, source_of_figure = memory_available(memory_limit, device)
    need = resident_need(groups, reader, dtype, int8, packed)
    if need > available:
        mode = Mode(dtype, int8, need=need)
        raise refusal(str(source), mode, available, source_of_figure, modes_that_fit(groups, reader, dtype, available, device))

    path = integer_path(dtype) if int8 and device.type == "cpu" else None
    cache = PreparedCache(cache_dir, directory, dtype, args.num_layers) if int8 and prepared_cache else None
    usable, why = cache.check() if cache is not None else (False, "off")
    try:
        model = _build(args, groups, reader, dtype, int8, lm_head, packed, device, path, cache if usable else None, cache)
        prepared = f"read from {cache.path}" if usable else None
    except DamagedCacheError as exc:  # a layer file failed its checksum: rebuilt from the checkpoint, never used
        usable, why = False, f"damaged ({exc})"
        model = _build(args, groups, reader, dtype, int8, lm_head, packed, device, path, None, cache)
    if cache is None:
        prepared = None if not int8 else "not used (prepared_cache=False)"
    elif cache.error is not None:  # a folder that cannot be written: the load goes on without a cache
        prepared = f"not written ({cache.error})"
    elif not usable:
        prepared = f"built at {cache.path}: {why}"
    model.source_dir = directory
    model.int8, model.packed = int8, packed
    model.dtype_reason = dtype_reason
    model.prepared = prepared
    model.int8_kernel = (path.reason if path is not None else integer_reason(dtype) if device.type == "cpu" else "weight-only int8") if int8 else None
    return model.eval().requires_grad_(False)


def _build(args, groups, reader, dtype, int8, lm_head, packed, device, path, source, target) -> MoEDecoder:
    """The model, its decoder layers read from the prepared cache `source` where given, else from the checkpoint
    (and then written to `target` where given), packed for the integer path where `path` is one."""
    with torch.device("meta"):
        model = use_kernels(MoEDecoder(args, with_lm_head=lm_head), dtype, packed)
    if source is None and target is not None:
        target.start_writing()  # OSError: noted in target.error, and nothing more is written
    with source.layers_in_order() if source is not None else nullcontext() as prepared:
        _fill(model, args, groups, reader, dtype, int8, packed, device, path, prepared, target)
    if source is None and target is not None and target.error is None:
        target.finish_writing()
    unset = [n for n, p in model.named_parameters() if p.is_meta]
    if unset:  # the name map forgot a parameter: a bug in moee-ref, not in the checkpoint
        raise AssertionError(f"parameters left unloaded: {unset}")
    return model


def _fill(model, args, groups, reader, dtype, int8, packed, device, path, prepared, target) -> None:
    """Each group of the checkpoint into the model in order: a decoder layer from `prepared` (an iterator of the
    prepared cache's layers) where given, else read from the checkpoint and quantized (and written to `target`)."""
    for index, group in enumerate(groups):
        layer = index - 1 if int8 and 1 <= index <= args.num_layers else None
        if layer is not None and prepared is not None:
            block = model.layers[layer]
            with torch.device("meta"):
                quantize_block_(block)  # the int8 modules' shapes, for the tensors read next
            block.load_state_dict(next(prepared), strict=True, assign=True)
        else:
            names = [leaf.name for recipe in group.values() for leaf in leaves(recipe)]  # the order fill_module reads in
            with reader.reading() as shards, ReadAhead(shards.read, names) as ahead:
                fill_module(model, group, ahead.read, dtype, packed)
            if layer is not None:
                quantize_block_(model.layers[layer])  # before the next layer is read: never all of it in float
                if target is not None and target.error is None:
                    target.write_layer(layer, model.layers[layer].state_dict())
        if layer is not None and path is not None:
            pack_block_(model.layers[layer], path)
        if device.type != "cpu":  # read to host, moved a layer at a time: one layer's host copy at most
            for module in _filled_by(model, index, args.num_layers):
                module.to(device)


def checked_checkpoint(source: str | os.PathLike, lm_head: bool = True):
    """(directory, ModelArgs, ShardReader, name map groups) of a checkpoint whose every expected tensor was found
    by name and shape in the shard headers; no weight is read. lm_head=False drops the head from the groups."""
    directory = resolve_source(source)
    args = read_config(directory)
    reader = ShardReader(shard_files(directory))
    check_sizes(args, reader)  # before the name map, which grows with layers x experts
    args = with_checkpoint_layout(args, reader.shapes)
    groups = name_map_groups(args)
    reader.check(expected_shapes(groups), integer_leaves(groups))
    if not lm_head:
        groups[-1] = {name: recipe for name, recipe in groups[-1].items() if name != "lm_head.weight"}
    return directory, args, reader, groups


def check_sizes(args, reader: ShardReader) -> None:
    """Counts in config.json against what the shard headers hold, from arithmetic alone: a config that describes
    a far larger model than the weights (10^8 layers, 10^7 experts) is refused before anything of its size is built."""
    stored_layers = {int(m.group(1)) for name in reader.shapes for m in [LAYER_INDEX.search(name)] if m}
    if args.num_layers > len(stored_layers):
        held = f"layers {min(stored_layers)} to {max(stored_layers)}" if stored_layers else "no decoder layers"
        raise CheckpointError(
            f"config.json says num_hidden_layers={args.num_layers}, but the shards hold {held} "
            f"({len(stored_layers)} layer(s)); check that config.json belongs to these weights"
        )
    parameters = args.parameter_counts()[0]
    stored = sum(end - start for _, start, end in reader.spans.values())
    if parameters > stored:  # every parameter takes at least one byte
        raise CheckpointError(
            f"config.json describes a model of {parameters:,} parameters ({args.num_layers} layers, {args.num_experts} experts "
            f"of size {args.expert_size}, hidden size {args.hidden_size}), but the shards hold only {stored:,} bytes of "
            "tensors; check that config.json belongs to these weights"
        )


def choose_mode(source: str | os.PathLike, dtype: torch.dtype, memory_limit: str | int | None = None) -> tuple[Mode, str | None]:
    """The first way of loading `source` in `dtype` that fits this process's memory, from the headers alone:
    resident, then resident int8, then layer-streamed (dtype, then int8); with a one-line note when it is
    not the first. InsufficientMemoryError when nothing fits."""
    _, _, reader, groups = checked_checkpoint(source, lm_head=False)  # embeddings need no head
    available, figure = memory_available(memory_limit)
    packed = dtype == torch.float32 and packing_available()
    resident = Mode(dtype, need=resident_need(groups, reader, dtype, False, packed))
    if resident.need <= available:
        return resident, None
    fitting = [mode for mode in modes_that_fit(groups, reader, dtype, available) if mode.dtype == dtype]
    if not fitting:
        raise refusal(str(source), resident, available, figure, [])
    chosen = fitting[0]
    note = (f"{resident.describe()} needs about {format_bytes(resident.need)}, more than the {format_bytes(available, up=False)} "
            f"this process may use ({figure}); running {chosen.sized()} instead. "
            "--dtype, --int8 or --memory-budget choose the mode yourself")
    return chosen, note


def memory_fit(source: str | os.PathLike, memory_limit: str | int | None = None) -> dict:
    """For `moee info`: the bytes each resident mode of an embedding load needs, and what this process may use.
    int8 in the compute dtype "auto" picks here; "slow" marks bf16 where this CPU emulates it."""
    _, _, reader, groups = checked_checkpoint(source, lm_head=False)
    available, figure = memory_available(memory_limit)
    auto, _ = resolve_dtype("auto")
    modes = []
    for dtype, int8 in ((torch.float32, False), (torch.bfloat16, False), (auto, True)):
        packed = dtype == torch.float32 and not int8 and packing_available()  # as from_pretrained loads it
        mode = Mode(dtype, int8, need=resident_need(groups, reader, dtype, int8, packed))
        slow = dtype == torch.bfloat16 and not int8 and auto != torch.bfloat16
        modes.append({"mode": mode.describe(), "need_bytes": mode.need, "fits": mode.need <= available, "slow": slow})
    return {"available_bytes": available, "source": figure, "modes": modes}


class ReadAhead:
    """Reads tensors in a known order in a background thread, a few tensors ahead of their use.

    Reading (pread, which releases the GIL) then overlaps converting and
    packing the tensors before it, for the memory of at most `depth` stored
    tensors more.
    """

    def __init__(self, read, names: list[str], depth: int = 2):
        self.names = iter(names)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read_all, args=(read, list(names)), daemon=True)
        self.thread.start()

    def _read_all(self, read, names: list[str]) -> None:
        for name in names:
            if self.stop.is_set():
                return
            try:
                self.ready.put((name, read(name)))
            except BaseException as exc:  # handed to the reader of that tensor
                self.ready.put((name, exc))
                return

    def read(self, name: str) -> torch.Tensor:
        expected = next(self.names, None)
        if name != expected:  # fill_module read in another order than load_model listed: a bug, not bad input
            raise AssertionError(f"read {name}, expected {expected}")
        _, tensor = self.ready.get()
        if isinstance(tensor, BaseException):
            raise tensor
        return tensor

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a put into a full queue, then let the thread see stop
            try:
                self.ready.get(timeout=0.01)
            except queue.Empty:
                pass


def build(recipe: Recipe, read: Callable[[str], torch.Tensor], dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Materialise one parameter, converting each leaf to dtype as it is read.

    Concatenated and stacked parameters are filled in place, leaf by leaf, so
    that building 64 experts never holds them twice (as pieces, then stacked).
    """
    if isinstance(recipe, Tensor):
        leaf = read(recipe.name)
        return leaf.to(dtype) if out is None else out.copy_(leaf)
    if isinstance(recipe, Mxfp4):
        return dequantize_mxfp4(read(recipe.blocks.name), read(recipe.scales.name), dtype, out)
    if isinstance(recipe, (Transposed, Deinterleaved)):
        # Built whole, then reordered: one extra copy of this tensor (a layer's experts) while it is loaded.
        inner = build(recipe.part, read, dtype)
        if isinstance(recipe, Transposed):
            result = inner.transpose(-1, -2)
        else:
            size = inner.shape[recipe.dim]
            order = torch.cat((torch.arange(0, size, 2), torch.arange(1, size, 2)))
            result = inner.index_select(recipe.dim, order)
        return result.contiguous() if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(shape_of(recipe), dtype=dtype)
    if isinstance(recipe, Stack):
        for i, part in enumerate(recipe.parts):
            build(part, read, dtype, out[i])
    else:
        start = 0
        for part in recipe.parts:
            rows = shape_of(part)[0]
            build(part, read, dtype, out[start : start + rows])
            start += rows
    return out


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes 0-15


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 blocks [..., G, 16] (uint8, two e2m1 values a byte, low nibble first) and scales [..., G] (uint8,
    exponent + 127) -> [..., G * 32] in dtype. Exact in bf16 and float32 (at most two significant bits times a
    power of two). Done one slice of the leading dim at a time, so the lookup indices never span a whole layer."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(
            f"MXFP4 blocks {list(blocks.shape)} ({blocks.dtype}) and scales {list(scales.shape)} ({scales.dtype}) do not "
            "belong together: blocks must be uint8 [..., G, 16] and scales uint8 [..., G]"
        )
    *outer, groups, width = blocks.shape
    if out is None:
        out = torch.empty(*outer, groups * width * 2, dtype=dtype)
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    flat_blocks, flat_scales, flat_out = blocks.reshape(-1, groups, width), scales.reshape(-1, groups), out.view(-1, groups * width * 2)
    for i in range(len(flat_blocks)):
        codes = flat_blocks[i]
        values = torch.stack((table[(codes & 0x0F).long()], table[(codes >> 4).long()]), dim=-1).reshape(groups, width * 2)
        exponents = flat_scales[i].to(torch.int32) - 127
        flat_out[i].copy_(torch.ldexp(values, exponents[:, None]).reshape(-1))
    return out


def _filled_by(model: MoEDecoder, index: int, num_layers: int) -> list[nn.Module]:
    """The modules name-map group `index` fills: the embedding, one decoder layer, or the final norm and head."""
    if index == 0:
        return [model.embed]
    if index <= num_layers:
        return [model.layers[index - 1]]
    return [m for m in (model.norm, model.lm_head) if m is not None]


def check_int8(dtype: torch.dtype, int8: bool) -> None:
    if int8 and dtype == torch.float64:
        raise CheckpointError("int8=True does not combine with float64, the exact reference mode; use dtype float32 or bfloat16 with int8")


def check_packing(packed: bool, dtype: torch.dtype, int8: bool) -> None:
    if not packed:
        return
    if not packing_available():
        raise CheckpointError("packed=True needs torch built with oneDNN (torch.backends.mkldnn); load with packed=False")
    if dtype != torch.float32 or int8:
        raise CheckpointError("packed=True is for float32 weights; it does not combine with another dtype or with int8")


def fill_module(module: nn.Module, names_to_recipes: NameMap, read, dtype: torch.dtype, packed: bool = False) -> None:
    """Build every parameter of a name map from the shards and put it in place.

    packed: matrices are packed for oneDNN as they are built. The routed
    experts are then built and packed one at a time into a list, so a float
    copy of a layer's stacked experts never exists beside the packed one.
    The embedding table keeps a bf16/fp16 storage dtype.
    """
    for name, recipe in names_to_recipes.items():
        if packed and isinstance(recipe, Stack):  # a PackedExperts list (kernels/experts.py), filled expert by expert
            staging = torch.empty(shape_of(recipe.parts[0]), dtype=dtype)  # one buffer for all: no fresh pages each time
            matrices = module.get_submodule(name)
            for i, part in enumerate(recipe.parts):
                matrices[i] = nn.Parameter(pack_weight(build(part, read, dtype, out=staging)), requires_grad=False)
            continue
        if packed and name == "embed.weight" and isinstance(recipe, Tensor):
            # Widening bf16 or fp16 to float32 is exact: the table stays as stored (half the bytes of float32),
            # and only the rows looked up are widened.
            table = read(recipe.name)
            assign_parameter(module, name, table if table.dtype in (torch.bfloat16, torch.float16) else table.to(dtype))
            continue
        tensor = build(recipe, read, dtype)
        if packed and tensor.dim() == 2 and name.endswith(".weight") and name != "lm_head.weight":  # the head: logits only
            tensor = pack_weight(tensor)
        assign_parameter(module, name, tensor)


def assign_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a built tensor in place of the (meta) parameter `name` of module."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    current = getattr(owner, attr)
    if current.shape != tensor.shape:  # the name map and the model disagree: a bug, not bad input
        raise AssertionError(f"{name}: built {tuple(tensor.shape)}, model expects {tuple(current.shape)}")
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=False))
