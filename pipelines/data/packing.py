"""Sequence packing for causal-LM text: several examples per row, position ids restarting per example, and no
attention (and no loss term) across examples.

Four pieces, used in this order::

    rows = pack(train, max_length)                    # PackedDataset: a plan over the examples, rows built lazily
    rows = PackedDataset(train, shard(rows.plan, rank, world))   # a worker's part: shard the plan, not the rows
    batch = collate([rows[i] for i in ...], pad_id)   # dataset.collate, unchanged: pads position_ids with 0
    logits = model(**packed_batch(inputs, attention_implementation(model, max_length))).logits

A packed row (:func:`packed_example`) is its examples' ``input_ids`` and ``labels`` concatenated, an
``attention_mask`` of ones (``collate`` turns it into the usual 2-D padding mask, so ``count_tokens`` still
counts real tokens) and ``position_ids`` that restart at 0 for each example. The label of each example's first
token is set to -100: the loss shifts labels (position t predicts ``labels[t+1]``,
``pipelines.training.step.chunked_token_loss_sum``), so the last token of one example would otherwise be scored
on predicting the first token of the next one. The first token of an unpacked example is never a target either,
so a packed row's loss terms are exactly its examples' loss terms.

No attention across examples: why a 4-D mask (what transformers 5.24 does, read in ``masking_utils.py``).
``create_causal_mask`` calls ``_preprocess_mask_arguments``, which detects packing
(``find_packed_sequence_indices``: a new sequence wherever ``position_ids`` do not step by +1) only when
``position_ids is not None and attention_mask is None and cache is None``. Our batches carry a 2-D
``attention_mask`` (padding), and in training ``LlamaModel.forward`` / ``Qwen2Model.forward`` create a
``DynamicCache`` whenever ``use_cache`` is true, which it is by default (``merge_with_config_defaults`` takes
``config.use_cache = True``; only gradient checkpointing turns it off). With the 2-D mask, or with it dropped but
the cache created, the model builds a plain causal (+ padding) mask: every token attends to the earlier examples
of its row, silently (``tests/data/test_packing.py`` pins both cases). A 4-D mask, by contrast, is returned as
is by ``_preprocess_mask_arguments`` ("If the mask is already 4D, simply return as-is"), whatever the cache, and
handed to the attention function: ``sdpa_attention_forward`` passes it to ``F.scaled_dot_product_attention`` as
``attn_mask`` (``is_causal`` is then False), ``eager_attention_forward`` adds it to the scores. So
:func:`packed_batch` replaces the collated 2-D ``attention_mask`` by a 4-D one, (B, 1, T, T):

    query q may see key k  iff  same example (same row segment) and k <= q and both are real tokens,
    and every position sees itself (a padding token sees only itself: no softmax row is empty, no NaN).

Segments are counted from the position ids (a new one at every 0); padding (``attention_mask == 0``) neither
attends nor is attended, and its labels are -100 (``collate``), so it is never scored. For ``sdpa`` the mask is
bool (True = attend, as ``F.scaled_dot_product_attention`` and transformers' ``sdpa_mask`` take it); for
``eager`` it is additive float (0 / the dtype's minimum, as transformers' ``eager_mask`` makes it): ``eager``
ADDS the mask to the scores, so a bool mask there would be wrong without any error, which is why the
implementation is an argument and not a guess. Other implementations (flash_attention_2/3, flex_attention)
are refused: flash kernels take no 4-D mask (they would need ``attention_mask=None`` + ``use_cache=False``, and
derive varlen boundaries from ``position_ids``), not verified here. A sliding window is not applied by the 4-D
mask, so :func:`attention_implementation` refuses a model whose window is shorter than the rows.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence
from typing import Any

import torch

from pipelines.data.dataset import IGNORE_INDEX, shard

TEXT_KEYS = ("input_ids", "attention_mask", "labels")  # what a packable example holds, no more
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids")
MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take packed_batch's 4-D mask


# ---------------------------------------------------------------- the plan
def pack_plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Groups example indices into rows whose lengths sum to at most ``max_length``: best-fit decreasing.

    Examples are taken longest first (ties: lower index first) and each goes into the row with the least room
    that still fits it (ties: the row opened first), else into a new row. Why this and not a greedy pass in
    data order: it fills rows far better (the long examples are placed first, the short ones fill the gaps; a
    greedy pass closes a row at the first example that does not fit), and fewer rows means less padding and
    fewer steps; it is deterministic (a function of ``lengths`` and ``max_length`` only) and O(n log n) (the
    rows' free room is kept sorted). An example longer than ``max_length`` is a row of its own.

    Every index is in exactly one row; indices within a row are ascending, and rows are ordered by their first
    (lowest) index, so the rows follow the data's order roughly and the longest examples do not all come first.
    Shuffle rows, not examples, between epochs.
    """
    max_length = _positive(max_length, "pack_plan: max_length")
    sizes = [_positive(n, f"pack_plan: example {i}'s length") for i, n in enumerate(lengths)]
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row number) of the rows that can still take something, sorted
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        n = sizes[i]
        if n > max_length:
            rows.append([i])
            continue
        at = bisect.bisect_left(room, (n, -1))  # the row with the least room >= n (lowest number on a tie)
        if at < len(room):
            free, row = room.pop(at)
            rows[row].append(i)
        else:
            free, row = max_length, len(rows)
            rows.append([i])
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def _positive(n: Any, what: str) -> int:
    """``n`` as a Python int (numpy integers too: ``Examples.lengths()``), or ValueError unless it is >= 1."""
    try:
        value = None if isinstance(n, bool) or type(n).__name__ == "bool_" else operator.index(n)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"{what} is {n!r}; it must be a positive int")
    return value


# ---------------------------------------------------------------- one row
def check_example(example: dict, where: str = "an example") -> int:
    """The token count of a packable example; ValueError naming the fix for anything but causal-LM text."""
    images = [k for k in example if k in IMAGE_KEYS or "pixel" in k or "image" in k]
    if images:
        raise ValueError(f"{where} has image tensors ({', '.join(f'`{k}`' for k in images)}): packing is for "
                         "text-only causal-LM data; set train.packing: false for image (VLM) data.")
    missing = [k for k in TEXT_KEYS if k not in example]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(f'`{k}`' for k in missing)}: packing takes tokenised examples "
                         "(input_ids, attention_mask, labels) as pipelines.data.dataset makes them.")
    labels = example["labels"]
    if labels.dim() == 0:
        raise ValueError(f"{where} is a sequence-classification example (one class label, not one label per "
                         "token): packing is for causal-LM text only; set train.packing: false for classifiers.")
    extra = [k for k in example if k not in TEXT_KEYS]
    if extra:
        raise ValueError(f"{where} has fields packing does not know ({', '.join(f'`{k}`' for k in extra)}): "
                         "packing is for plain causal-LM text; set train.packing: false for this data.")
    ids, mask = example["input_ids"], example["attention_mask"]
    if ids.dim() != 1 or labels.shape != ids.shape or mask.shape != ids.shape:
        raise ValueError(f"{where}: input_ids, attention_mask and labels must be 1-D and equally long, got "
                         f"{tuple(ids.shape)}, {tuple(mask.shape)}, {tuple(labels.shape)}")
    if len(ids) == 0:
        raise ValueError(f"{where} has no tokens; drop empty examples before packing.")
    if not bool(mask.all()):
        raise ValueError(f"{where} has padding (zeros in its attention_mask): pack unpadded examples (pad after "
                         "packing, in collate).")
    return len(ids)


def packed_example(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """One packed row from tokenised text examples (1-D ``input_ids``, ``attention_mask``, ``labels``).

    Returns ``input_ids`` and ``labels`` concatenated, ``attention_mask`` all ones, ``position_ids`` 0..n-1 per
    example, and -100 as the label of every example's first token (no loss term across a boundary: position t
    predicts ``labels[t+1]``). Raises ValueError for image tensors or classification labels (0-d)."""
    if not examples:
        raise ValueError("packed_example: no examples")
    lengths = [check_example(ex, f"example {k} of the row") for k, ex in enumerate(examples)]
    labels = torch.cat([ex["labels"] for ex in examples])
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[starts] = IGNORE_INDEX  # torch.cat made a copy: the examples' own labels stay as they are
    return {
        "input_ids": torch.cat([ex["input_ids"] for ex in examples]),
        "attention_mask": torch.cat([ex["attention_mask"] for ex in examples]),
        "labels": labels,
        "position_ids": torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]),
    }


class PackedDataset(Sequence):
    """A read-only sequence of packed rows over ``examples`` (any sequence, lazy ones included) and ``plan``
    (rows of indices into it, e.g. :func:`pack_plan`'s): row ``i`` is built when it is read, never before.
    A slice is a ``PackedDataset`` over the same examples and the sliced plan (still lazy)."""

    def __init__(self, examples: Sequence[dict], plan: Sequence[Sequence[int]]):
        n = len(examples)
        rows = []
        for r, row in enumerate(plan):
            row = [int(i) for i in row]
            if not row:
                raise ValueError(f"PackedDataset: row {r} of the plan is empty")
            bad = [i for i in row if not 0 <= i < n]
            if bad:
                raise ValueError(f"PackedDataset: row {r} names example {bad[0]}, but there are {n} examples")
            rows.append(tuple(row))
        self._examples = examples
        self._plan = tuple(rows)

    @property
    def plan(self) -> list[list[int]]:
        """The rows' example indices (a copy)."""
        return [list(row) for row in self._plan]

    @property
    def examples(self) -> Sequence[dict]:
        return self._examples

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, i: Any):
        if isinstance(i, slice):
            return PackedDataset(self._examples, self._plan[i])
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                i = i.__index__()
            except AttributeError:
                raise TypeError(f"PackedDataset indices must be ints or slices, not {type(i).__name__}") from None
        row = self._plan[i]  # IndexError as a list raises it
        try:
            return packed_example([self._examples[j] for j in row])
        except ValueError as err:
            raise ValueError(f"packed row {i} (examples {list(row)}): {err}") from err

    def __repr__(self) -> str:
        return f"PackedDataset({len(self._plan)} rows over {len(self._examples)} examples)"


def pack(examples: Sequence[dict], max_length: int, lengths: Sequence[int] | None = None) -> PackedDataset:
    """``examples`` packed into rows of at most ``max_length`` tokens (:func:`pack_plan`), built lazily.

    ``lengths``: each example's token count; by default ``examples.lengths()`` where the sequence has it (the
    lazy ``pipelines.data.lazy.Examples``: from the cache file's index, nothing read), else every example is read
    once to measure (and check) it. With lengths only the first example is read and checked, so an image or
    classification data set still fails here, at set-up (a data file holds one record shape)."""
    if lengths is None and callable(getattr(examples, "lengths", None)):
        lengths = examples.lengths()
    if lengths is None:
        lengths = [check_example(ex, f"example {i}") for i, ex in enumerate(examples)]
    else:
        if len(lengths) != len(examples):
            raise ValueError(f"pack: {len(lengths)} lengths for {len(examples)} examples")
        if len(examples):
            check_example(examples[0], "example 0")
    return PackedDataset(examples, pack_plan(list(lengths), max_length))


def packed_shard(examples: Sequence[dict], max_length: int, rank: int, world_size: int) -> PackedDataset:
    """Worker ``rank``'s packed rows: the whole set packed the same way on every rank, then the plan sharded
    (``dataset.shard``: equal parts), so every rank runs the same number of steps and no row is built up front."""
    return PackedDataset(examples, shard(pack(examples, max_length).plan, rank, world_size))


def fill(rows: PackedDataset | Sequence[Sequence[int]], lengths: Sequence[int], max_length: int) -> float:
    """Real tokens / (rows x ``max_length``): how full a plan's rows are (1.0: no padding at all)."""
    plan = rows.plan if isinstance(rows, PackedDataset) else rows
    return sum(lengths[i] for row in plan for i in row) / max(1, len(plan) * max_length)


# ---------------------------------------------------------------- the model's side
def attention_implementation(model, max_length: int | None = None) -> str:
    """The attention implementation of ``model`` (DDP-wrapped, PEFT or plain) for :func:`packed_batch`; a
    ValueError naming the fix when it cannot take the 4-D mask, or when it uses a sliding window shorter than
    ``max_length`` (the 4-D mask does not apply the window)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    config = inner.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in MASKED_ATTENTION:
        raise ValueError(f"packing needs attention that takes a 4-D mask ({' or '.join(MASKED_ATTENTION)}); the "
                         f"model uses {impl!r}: set model.attn_implementation: sdpa, or train.packing: false.")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    sliding = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if sliding and max_length is not None and window < max_length:
        raise ValueError(f"the model attends within a sliding window of {window} tokens, shorter than the packed "
                         f"rows ({max_length}); packing does not apply the window: set data.max_length <= {window}, "
                         "or train.packing: false.")
    return impl


def block_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) bool mask of a collated packed batch: True where query q may attend key k (same example,
    k <= q, both real tokens), and on the diagonal (padding attends only itself)."""
    if position_ids.dim() != 2 or attention_mask.shape != position_ids.shape:
        raise ValueError(f"position_ids and attention_mask (B, T) expected, got {tuple(position_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    segment = (position_ids == 0).cumsum(dim=1)  # a new example at every position 0 (padding: one of its own)
    real = attention_mask.bool()
    length = position_ids.shape[1]
    idx = torch.arange(length, device=position_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]: k <= q
    same = segment[:, :, None] == segment[:, None, :]
    allowed = same & causal & real[:, :, None] & real[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    return allowed[:, None]


def packed_batch(batch: dict, attn_implementation: str, dtype: torch.dtype = torch.float32) -> dict:
    """A collated batch of packed rows (``dataset.collate`` of :class:`PackedDataset` rows) as model inputs: the
    same dict with its 2-D ``attention_mask`` replaced by the 4-D block-diagonal causal mask of
    :func:`block_mask` — bool for ``sdpa``, additive ``dtype`` (0 / finfo.min) for ``eager`` — and
    ``position_ids`` kept (the rotary embedding restarts per example). Other keys (``labels``) pass through.

    Call it on the batch handed to the model, not the one the step counts: ``count_tokens`` reads the 2-D mask.
    ``attn_implementation``: :func:`attention_implementation` of the model."""
    if "position_ids" not in batch:
        raise ValueError("packed_batch: the batch has no position_ids; it is not a batch of packed rows "
                         "(collate PackedDataset rows)")
    if attn_implementation not in MASKED_ATTENTION:
        raise ValueError(f"packed_batch: attention {attn_implementation!r} does not take a 4-D mask; use "
                         f"{' or '.join(MASKED_ATTENTION)}")
    mask = batch["attention_mask"]
    if mask.dim() != 2:
        raise ValueError(f"packed_batch: a collated 2-D attention_mask expected, got {mask.dim()}-D (applied twice?)")
    allowed = block_mask(batch["position_ids"], mask)
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        allowed = torch.where(allowed, zero, torch.finfo(dtype).min)  # as transformers' eager_mask
    return {**batch, "attention_mask": allowed}
