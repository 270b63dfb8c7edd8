"""Layer-streamed corpus mode: embed with a model larger than memory.

Every batch of a corpus goes through decoder layer l before layer l+1 is
read, so each weight is read from the safetensors shards once per corpus,
not once per batch. Only one layer (two while the next one is read ahead)
is ever resident, converted to the compute dtype or to int8. The hidden
states of all batches between layers stay in memory up to the budget and are
spilled to a temporary file beyond it, whose name is removed as soon as it is
mapped: however the process ends, no spill file is left on disk.

The arithmetic is the resident model's own: the same Block modules, built
layer by layer from the same name map and driven through the decoder's own
layer loop (decoder/model.py `run_layers`), so results match the resident
mode. What is this file's own is the schedule: the memory plan, the
activation store and reading the next layer ahead.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..decoder.batch import check_batches
from ..decoder.layers import RMSNorm
from ..decoder.model import Block, DecoderOutput, LayerPass, PrefixPass, run_layers
from ..errors import CheckpointError, InputError, MoEERefError
from ..families.names import leaves
from ..progress import progress
from ..kernels import quantize_block_, use_kernels
from ..kernels.int8 import integer_path, integer_reason, pack_block_
from .checkpoint import check_int8, check_packing, checked_checkpoint, fill_module
from .memory import InsufficientMemoryError, format_bytes, held_bytes, memory_available, parse_bytes, streamed_budget, streamed_weights_need

WORKING_FACTOR = 12  # transient tensors of one batch in one block, in units of that batch's hidden states
RUNTIME_OVERHEAD = 256 * 2**20  # allowance for what is not weights or activations (index tensors, routing outputs)


class SpillError(MoEERefError, OSError):
    """Spilling activations to disk failed (typically: the disk is full)."""


@dataclass
class StreamStats:
    weight_bytes_read: int = 0  # bytes of checkpoint tensors read (their stored dtype)
    spilled: bool = False
    activation_bytes: int = 0
    layer_bytes_max: int = 0


class ActivationStore:
    """Hidden states of every batch between layers: in memory, or in a temporary file when over budget."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, budget: int, spill_dir: str | None):
        self.shapes, self.dtype = list(shapes), dtype  # shapes: the largest each batch's slot holds
        self.element = element = torch.tensor([], dtype=dtype).element_size()
        sizes = [int(np.prod(s)) * element for s in shapes]
        self.total = sum(sizes)
        self.spilled = self.total > budget
        self.tensors: list[torch.Tensor | None] = [None] * len(shapes)
        self.directory = None
        if self.spilled:
            self.offsets = np.cumsum([0] + sizes)
            try:
                self.directory = tempfile.mkdtemp(prefix="moee-spill-", dir=spill_dir)
            except OSError as exc:
                raise SpillError(f"cannot create a spill directory in {spill_dir or tempfile.gettempdir()}: {exc}") from exc
            self.path = os.path.join(self.directory, "activations.bin")
            try:
                with open(self.path, "w+b") as handle:
                    # Reserve the whole file now: a full disk fails here, before any compute.
                    os.posix_fallocate(handle.fileno(), 0, self.total)
                    self.memmap = np.memmap(handle, dtype=np.uint8, mode="r+", shape=(self.total,))
            except OSError as exc:
                self.close()
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpillError(
                        f"no room to spill {format_bytes(self.total)} of activations in {spill_dir or tempfile.gettempdir()}: "
                        "free disk space, choose another --spill-dir, or raise the memory budget"
                    ) from exc
                raise SpillError(f"cannot create the spill file in {spill_dir or tempfile.gettempdir()}: {exc}") from exc
            # The mapping holds the space; the name goes now, so that no way of ending the process
            # (SIGKILL and the kernel's OOM killer included) leaves many GB behind in the spill directory.
            self.close_names()

    def put(self, index: int, tensor: torch.Tensor) -> None:
        if not self.spilled:
            self.tensors[index] = tensor
            return
        raw = tensor.contiguous().view(torch.uint8).numpy().reshape(-1)
        start = self.offsets[index]
        if start + raw.size > self.offsets[index + 1]:
            raise ValueError(f"batch {index}: {tuple(tensor.shape)} does not fit its slot of {self.shapes[index]}")
        try:
            # The last block may return fewer positions (keep_positions): they go at the start of the slot.
            self.memmap[start : start + raw.size] = raw
        except OSError as exc:  # pragma: no cover - the space was reserved up front
            raise SpillError(f"writing spilled activations failed: {exc}") from exc
        self.shapes[index] = tuple(tensor.shape)

    def get(self, index: int) -> torch.Tensor:
        if not self.spilled:
            return self.tensors[index]
        start = self.offsets[index]
        raw = np.array(self.memmap[start : start + int(np.prod(self.shapes[index])) * self.element])
        return torch.from_numpy(raw).view(self.dtype).reshape(self.shapes[index])

    def close_names(self) -> None:
        """Remove the spill file's name and its directory (an open mapping keeps the data until closed)."""
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def close(self) -> None:
        if getattr(self, "memmap", None) is not None:
            del self.memmap
        self.close_names()


class StreamedModel:
    """Runs whole corpora through a checkpoint one decoder layer at a time (see the module doc)."""

    def __init__(self, source, dtype: torch.dtype = torch.float32, *, memory_budget, int8: bool = False,
                 spill_dir: str | None = None, prefetch: bool = True, packed: bool = False,
                 memory_limit: str | int | None = None, device: str | torch.device = "cpu"):
        """device: where the layers compute. Weights are read to the host and each layer moved there as it
        comes; the activations stay in the host's store (memory_budget) and go to the device for each layer."""
        check_int8(dtype, int8)
        check_packing(packed, dtype, int8)
        self.device = torch.device(device)
        if packed and self.device.type != "cpu":
            raise CheckpointError("packed=True is oneDNN's CPU layout; stream with packed=False on a CUDA device")
        self.source_dir, self.args, self.reader, groups = checked_checkpoint(source)
        self.embed_group, self.layer_groups = groups[0], groups[1:-1]
        self.norm_group = {k: v for k, v in groups[-1].items() if k != "lm_head.weight"}
        self.dtype, self.int8, self.prefetch, self.packed = dtype, int8, prefetch, packed
        self.int8_path = integer_path(dtype) if int8 and self.device.type == "cpu" else None
        self.int8_kernel = (self.int8_path.reason if self.int8_path else integer_reason(dtype) if self.device.type == "cpu"
                            else "weight-only int8") if int8 else None
        self.prepared = None  # streamed layers are read from the checkpoint each pass, never from the prepared cache
        self.budget = parse_bytes(memory_budget)
        self.spill_dir, self.memory_limit = spill_dir, memory_limit
        self.stats = StreamStats()
        self.element = torch.tensor([], dtype=dtype).element_size()
        self.layer_bytes = [held_bytes(group, dtype, int8) for group in self.layer_groups]
        self.stats.layer_bytes_max = max(self.layer_bytes)
        self.dtype_reason: str | None = None  # set by the embedder's loader: why this compute dtype
        # One run at a time: a run reads every layer once and holds the store of its batches (threads queue up).
        self._run_lock = threading.Lock()

    # ------------------------------------------------------------------ memory plan

    def _source_bytes(self, group) -> int:
        return sum(int(np.prod(leaf.shape)) * self.reader.element_size(leaf.name) for recipe in group.values() for leaf in leaves(recipe))

    def weights_need(self) -> int:
        """Bytes the weights take at the worst moment: a resident layer while the next one is built (memory.py)."""
        return streamed_weights_need(self.layer_groups, self.reader, self.dtype, self.int8, self.prefetch)

    def memory_plan(self, batch_shapes: list[tuple[int, int]]) -> dict[str, int]:
        """Bytes for weights, one batch's working memory, and the smallest budget that works for these batches."""
        d = self.args.hidden_size
        tokens = max(b * t for b, t in batch_shapes)
        largest_batch = tokens * d * self.element
        expert_temp = tokens * self.args.top_k * 3 * self.args.expert_size * self.element
        working = WORKING_FACTOR * largest_batch + expert_temp
        weights = max(self.weights_need(), self._source_bytes(self.embed_group))
        # The smallest budget keeps one batch's hidden states in memory and spills all others.
        smallest = weights + working + largest_batch + RUNTIME_OVERHEAD
        return {"weights": weights, "working": working, "smallest": smallest}

    def plan(self, batch_shapes: list[tuple[int, int]]) -> int:
        """Check the budget against one corpus and return the bytes left for stored activations."""
        need = self.memory_plan(batch_shapes)
        if self.budget < need["smallest"]:
            raise InputError(
                f"memory budget {format_bytes(self.budget, up=False)} is too small for one layer of this model at this batch size: "
                f"the smallest budget that works is {format_bytes(need['smallest'])} "
                f"(weights {format_bytes(need['weights'])}, batch working memory {format_bytes(need['working'])}); "
                "raise --memory-budget, lower --batch-size, or add --int8"
            )
        room = self.budget - need["weights"] - need["working"] - RUNTIME_OVERHEAD
        # What this run will take: a budget is a ceiling, and the activations of a small corpus stay below it.
        activations = sum(b * t for b, t in batch_shapes) * self.args.hidden_size * self.element
        use = need["weights"] + need["working"] + RUNTIME_OVERHEAD + min(activations, room)
        if self.device.type != "cpu":
            self._check_device(need, tokens=max(b * t for b, t in batch_shapes))
        available, source = memory_available(self.memory_limit)
        if use > available:
            budget = streamed_budget(need["smallest"], available, step=2**20)
            fix = (f"pass --memory-budget {format_bytes(budget, up=False)} or less (more of the activations go to disk)" if budget
                   else "lower --batch-size, or add --int8")
            raise InsufficientMemoryError(
                f"this run in memory budget {format_bytes(self.budget)} would take about {format_bytes(use)}, more than the "
                f"{format_bytes(available, up=False)} this process may use ({source}); nothing was read. {fix}"
            )
        return room

    def _check_device(self, need: dict[str, int], tokens: int) -> None:
        """The device holds the layer computing, the next one moved there while it computes (prefetch), and one batch."""
        layers = (2 if self.prefetch else 1) * max(self.layer_bytes)
        device_need = layers + need["working"] + tokens * self.args.hidden_size * self.element + RUNTIME_OVERHEAD
        available, source = memory_available(None, self.device)
        if device_need > available:
            raise InsufficientMemoryError(
                f"the layer-streamed mode on {self.device} needs about {format_bytes(device_need)} of device memory "
                f"({'two layers' if self.prefetch else 'one layer'} of {format_bytes(max(self.layer_bytes))} and one batch), more than the "
                f"{format_bytes(available, up=False)} there ({source}); nothing was read. Lower --batch-size, add --int8, "
                "or pass device='cpu' (--device cpu)")

    # ------------------------------------------------------------------ layers

    def _build(self, names_to_recipes, module):
        with self.reader.reading() as shards:
            fill_module(module, names_to_recipes, shards.read, self.dtype, self.packed)
        self.stats.weight_bytes_read += self._source_bytes(names_to_recipes)
        return module

    def build_layer(self, layer: int) -> Block:
        prefix = f"layers.{layer}."
        with torch.device("meta"):
            block = use_kernels(Block(self.args, layer), self.dtype, self.packed)
        group = {name[len(prefix):]: recipe for name, recipe in self.layer_groups[layer].items()}
        self._build(group, block)
        if self.int8:
            quantize_block_(block)
            if self.int8_path is not None:  # the same matmuls as a resident int8 model on this CPU
                pack_block_(block, self.int8_path)
        return block.eval().requires_grad_(False).to(self.device)  # read to the host, moved a layer at a time

    # ------------------------------------------------------------------ forward

    # Blocks' outputs between layers would have to be kept for every batch of the corpus.
    layer_states_available = False

    def run(self, batches, **options) -> list[DecoderOutput]:
        """Decoder outputs for every (input_ids, attention_mask, keep_positions) batch (see _run_locked)."""
        with self._run_lock:
            return self._run_locked(batches, **options)

    def _run_locked(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], *, position_ids=None,
            show_progress_bar: bool = False, prefix_ids: list[int] | None = None, continues: list[bool] | None = None,
            return_layer_states: bool = False) -> list[DecoderOutput]:
        """Decoder outputs for every (input_ids, attention_mask, keep_positions) batch, as MoEDecoder.run gives them;
        all batches go through each layer before the next layer is read.

        prefix_ids: tokens run once, layer by layer beside the batches; the batches flagged in `continues`
        hold only what follows them (as MoEDecoder.forward with a SharedPrefix), the others whole sequences.
        """
        if return_layer_states:
            raise InputError("the layer-streamed mode does not keep every block's output; run without return_layer_states")
        self.stats = StreamStats(layer_bytes_max=max(self.layer_bytes))  # the stats describe the last run
        if not batches:
            return []
        batches, continues = check_batches(self.args, batches, prefix_ids, continues, position_ids)
        activation_room = self.plan([tuple(ids.shape) for ids, _, _ in batches])
        shapes = [(ids.shape[0], ids.shape[1], self.args.hidden_size) for ids, _, _ in batches]
        store = ActivationStore(shapes, self.dtype, activation_room, self.spill_dir)
        self.stats.spilled, self.stats.activation_bytes = store.spilled, store.total
        try:
            return self._run(batches, store, position_ids, show_progress_bar, prefix_ids if any(continues) else None, continues)
        finally:
            store.close()

    def _run(self, batches, store: "ActivationStore", position_ids, show_progress_bar: bool, prefix_ids, continues):
        # Only the rows of the tokens present are converted: the table stays in its stored dtype.
        table_name = self.embed_group["embed.weight"].name
        passes = []
        with self.reader.reading() as shards:
            table = shards.read(table_name)
            device = self.device  # every tensor of a pass is made there; only x goes back to the host's store
            for i, ((ids, mask, keep), shifted) in enumerate(zip(batches, continues)):
                batch = StoredPass.start(
                    self.args, table[ids].to(self.dtype).to(device), mask.to(device), keep=None if keep is None else keep.to(device),
                    prefix_length=len(prefix_ids) if shifted else 0,
                    position_ids=None if position_ids is None else position_ids[i].to(device),
                )
                passes.append(batch.stored_in(store, i))
            # The shared prefix goes through the layers beside the batches; its keys and values are all they read.
            prefix = None if prefix_ids is None else PrefixPass.start(
                self.args, prefix_ids, table[torch.tensor([prefix_ids])].to(self.dtype).to(self.device))
        self.stats.weight_bytes_read += self._source_bytes(self.embed_group)
        del table

        with torch.inference_mode():
            run_layers(self._blocks(show_progress_bar), passes, prefix)
            norm = RMSNorm(self.args.hidden_size, self.args.rms_norm_eps)
            self._build({"weight": self.norm_group["norm.weight"]}, norm)
            norm.to(self.device)
            return [batch.finish(norm, self.args.moe_layers) for batch in passes]

    def _blocks(self, show_progress_bar: bool):
        """(layer, block) for every layer in order, each built from the shards as it comes, the next read
        ahead while this one computes (prefetch); a layer is freed before the one after next is built."""
        last = len(self.layer_groups) - 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(self.build_layer, 0)
            for layer in progress(range(len(self.layer_groups)), show_progress_bar, "streaming layers", "layer"):
                block = upcoming.result()
                if self.prefetch and layer < last:
                    upcoming = pool.submit(self.build_layer, layer + 1)  # read ahead while this layer computes
                # No context manager around the yield: one left open by an abandoned generator would leak its
                # mode into whatever the thread runs next. The caller runs the layers under inference_mode.
                yield layer, block
                del block
                release_freed_memory()
                if not self.prefetch and layer < last:
                    upcoming = pool.submit(self.build_layer, layer + 1)


class StoredPass(LayerPass):
    """A LayerPass whose hidden states live in the activation store between layers (in memory or spilled)."""

    def stored_in(self, store: "ActivationStore", index: int) -> "StoredPass":
        store.put(index, self.__dict__.pop("x").cpu())  # the store is the host's (on the CPU, .cpu() is no copy)
        self.store, self.index = store, index
        return self

    @property
    def x(self) -> torch.Tensor:
        return self.store.get(self.index).to(self.cos.device)  # to the device the pass computes on

    @x.setter
    def x(self, value: torch.Tensor) -> None:
        if "store" in self.__dict__:
            self.store.put(self.index, value.cpu())
        else:  # while the dataclass is built, before the pass is given its store
            self.__dict__["x"] = value


def release_freed_memory() -> None:
    """Give memory freed by the last layer back to the system (glibc keeps it otherwise, and the peak creeps up)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
