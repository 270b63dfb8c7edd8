"""Prepared int8 weights, stored once: the quantized decoder layers of a checkpoint, memory-mapped at later loads.

An int8 load spends most of its time quantizing (every weight read, widened
to float32 and rounded row by row). What comes out depends only on the
checkpoint, the compute dtype and moee-ref, so it is kept: one safetensors
file per decoder layer (safetensors only, never pickle), and a manifest
written last that names the checkpoint's identity (identity.py), moee-ref's
version, this format's number, the dtype, and each file's size and CRC-32.

A cache is used only when all of that matches: a checkpoint that changed
(another identity), another moee-ref, or a file whose size or checksum
differs (truncated, overwritten, bit rot) makes it stale or damaged, and it is
rebuilt from the checkpoint, never used. Every file is written under a
temporary name, fsynced and renamed; a rebuild first removes the manifest,
so an interrupted one leaves nothing that passes for a cache.

Where: the cache_dir option of load_model / from_pretrained (--cache-dir),
else $MOEE_CACHE_DIR, else $XDG_CACHE_HOME/moee-ref, else ~/.cache/moee-ref;
a subfolder per checkpoint directory and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..cache_dir import cache_root
from .identity import checkpoint_identity

FORMAT = 1  # raised whenever what a layer file holds changes (names, dtypes, quantization)
MANIFEST = "manifest.json"
SAFETENSORS_DTYPES = {"I8": torch.int8, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
CHUNK = 64 << 20  # bytes checksummed at a time
READ_THREADS = 4  # layer files read and checksummed at once
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
ALIGN = 64  # every tensor starts at a multiple of this in the file, as a vector load wants
# Bytes of padding after the last tensor: torch's weight-only int8 kernel reads a little past a matrix's end, which
# past the end of a mapped file is a segmentation fault (seen with the last matrix of a layer file).
TAIL = 4096
PADDING = "__padding"  # the names of the padding entries (plain U8 tensors: the file stays valid safetensors)


def moee_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moee-ref")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


class PreparedCache:
    """The int8 cache of one checkpoint directory in one compute dtype."""

    def __init__(self, root: str | os.PathLike | None, directory: Path, dtype: torch.dtype, num_layers: int):
        directory = Path(directory)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", directory.name) or "checkpoint"
        # Two checkpoints in folders of the same name do not share (and keep rebuilding) one cache.
        where = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:12]
        self.path = cache_root(root) / f"{name}-{where}" / f"int8-{str(dtype).removeprefix('torch.')}"
        self.num_layers = num_layers
        self.key = {
            "format": FORMAT,
            "moee_ref": moee_version(),
            "checkpoint": list(checkpoint_identity(directory)),
            "dtype": str(dtype).removeprefix("torch."),
            "layers": num_layers,
        }
        self.files: dict[str, dict] = {}
        self.error: str | None = None  # why writing stopped (a read-only or full disk), if it did

    # ------------------------------------------------------------------ reading

    def check(self) -> tuple[bool, str]:
        """(usable, why): the manifest matches this checkpoint, dtype and moee-ref, and every layer file is whole."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            return False, "no prepared cache yet"
        try:
            stored = json.loads(manifest.read_text(encoding="utf-8"))
            files = stored["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return False, f"damaged (its manifest is unreadable: {type(exc).__name__})"
        for field, expected in self.key.items():
            if stored.get(field) != expected:
                return False, f"stale ({field} is {stored.get(field)!r}, this load needs {expected!r})"
        for layer in range(self.num_layers):
            name = layer_file(layer)
            entry = files.get(name) if isinstance(files, dict) else None
            file = self.path / name
            if not isinstance(entry, dict) or not file.is_file():
                return False, f"damaged ({name} is missing)"
            if not isinstance(entry.get("crc32"), int):
                return False, f"damaged (the manifest has no checksum for {name})"
            if file.stat().st_size != entry.get("size"):
                return False, f"damaged ({name} has {file.stat().st_size} bytes, {entry.get('size')} were written)"
        self.files = files
        return True, "used"

    @contextmanager
    def layers_in_order(self) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
        """Every layer's tensors (read_layer) in order, READ_THREADS files read at once, after asking the kernel to
        read every file ahead: checksumming the mapped bytes is most of a cached load's time (zlib releases the
        GIL), and from disk several reads in flight go faster than one. Reads still under way when the loader stops
        (a damaged file) are cancelled or waited for, never left running."""
        for layer in range(self.num_layers):
            _read_ahead(self.path / layer_file(layer))
        pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="moee-prepared")
        try:
            yield pool.map(self.read_layer, range(self.num_layers))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """A layer's tensors: the int8 matrices views of the file's mapping (read once by the checksum; their pages
        are the file's, shared with the page cache and dropped under memory pressure rather than swapped), the
        small tensors copied. A file whose
        checksum or header does not match raises DamagedCacheError, for the loader to rebuild the cache."""
        name = layer_file(layer)
        file = self.path / name
        size = file.stat().st_size
        if size != self.files[name]["size"]:
            raise DamagedCacheError(f"{name} changed size since it was checked")
        data = torch.from_file(str(file), shared=False, size=size, dtype=torch.uint8)  # a private, lazy mapping
        raw = data.numpy()
        crc = 0
        for start in range(0, size, CHUNK):
            crc = zlib.crc32(raw[start : start + CHUNK], crc)
        if crc != self.files[name]["crc32"]:
            raise DamagedCacheError(f"{name} does not match its checksum")
        try:
            length = int.from_bytes(raw[:8].tobytes(), "little")
            header = json.loads(raw[8 : 8 + length].tobytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedCacheError(f"{name}: unreadable header ({exc})") from None
        tensors = {}
        base = 8 + length
        for key, info in header.items():
            if key == "__metadata__" or key.startswith(PADDING):
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            start, end = info["data_offsets"]
            shape = info["shape"]
            itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else 0
            if dtype is None or end - start != itemsize * _numel(shape) or base + end > size:
                raise DamagedCacheError(f"{name}: tensor {key} does not match its header")
            tensor = data[base + start : base + end].view(dtype).reshape(shape)
            # int8 matrices stay mapped; the rest (scales, norms, routers, biases) is small and copied, so that a
            # matrix packed elsewhere (kernels/int8.py) and dropped releases its mapping.
            tensors[key] = tensor if dtype == torch.int8 else tensor.clone()
        return tensors

    # ------------------------------------------------------------------ writing

    # Writing never fails a load: an OSError (a read-only folder, a full disk) is kept in self.error, what was
    # written so far is removed, and the model loads without a cache.

    def start_writing(self) -> None:
        """Clear what is there (the manifest first: from here on nothing passes for a cache) and make the folder."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MANIFEST).unlink(missing_ok=True)
            for old in self.path.iterdir():
                if old.name.startswith("layer-") or old.name.startswith(".tmp-"):
                    old.unlink(missing_ok=True)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
        self.files = {}

    def write_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        name = layer_file(layer)
        tensors = {k: v.detach().contiguous() for k, v in tensors.items() if v is not None}
        temporary = self.path / f".tmp-{os.getpid()}-{name}"
        try:
            write_safetensors(temporary, tensors, {"format": str(FORMAT)})
            crc = _sync_and_checksum(temporary)
            os.replace(temporary, self.path / name)
            self.files[name] = {"size": (self.path / name).stat().st_size, "crc32": crc}
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
            self._remove_layers()
        finally:
            temporary.unlink(missing_ok=True)

    def finish_writing(self) -> None:
        """The manifest, last: only now is the cache whole."""
        temporary = self.path / f".tmp-{os.getpid()}-{MANIFEST}"
        try:
            temporary.write_text(json.dumps({**self.key, "files": self.files}, indent=1), encoding="utf-8")
            _sync_and_checksum(temporary)
            os.replace(temporary, self.path / MANIFEST)
            descriptor = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # the renames themselves
            finally:
                os.close(descriptor)
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror or exc}"
            self._remove_layers()
        finally:
            temporary.unlink(missing_ok=True)

    def _remove_layers(self) -> None:
        for name in self.files:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError:
                pass


class DamagedCacheError(Exception):
    """A cache file that passed the manifest check but not its checksum or header: the loader rebuilds the cache."""


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """tensors as a safetensors file, each starting at a multiple of ALIGN bytes and TAIL bytes of padding at the end.
    The gaps are padding entries rather than holes, which the format does not allow."""
    header, order, offset = {"__metadata__": metadata}, [], 0
    for name, tensor in tensors.items():
        if offset % ALIGN:
            gap = ALIGN - offset % ALIGN
            header[f"{PADDING}.{len(order)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            order.append(bytes(gap))
            offset += gap
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # the bytes as they are in memory (little-endian)
        header[name] = {"dtype": SAFETENSORS_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        order.append(raw)
        offset += len(raw)
    header[f"{PADDING}.end"] = {"dtype": "U8", "shape": [TAIL], "data_offsets": [offset, offset + TAIL]}
    order.append(bytes(TAIL))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # the data starts aligned too
    with open(file, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for part in order:
            handle.write(memoryview(part))


def _read_ahead(file: Path) -> None:
    """Ask the kernel to start reading the whole file into the page cache now (where it can be asked)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        descriptor = os.open(file, os.O_RDONLY)
    except OSError:
        return  # a missing file is read_layer's to report
    try:
        advise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _numel(shape) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count


def _sync_and_checksum(file: Path) -> int:
    crc = 0
    with open(file, "rb") as handle:
        while block := handle.read(CHUNK):
            crc = zlib.crc32(block, crc)
        os.fsync(handle.fileno())
    return crc
