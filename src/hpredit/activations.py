"""Collecting residual-stream activations of contrastive completions, and storing them compactly."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .architecture import ModelFingerprint, backbone, decoder_layers, fingerprint, max_positions
from .checks import check_layers, is_int, layer_list_problem
from .data import SPLIT_NAMES, ContrastivePair, ContrastivePairs, as_pairs
from .errors import HpreditError
from .files import atomic_directory, file_digest, read_json
from .hooks import StopForward, record
from .models import pad_token_id
from .prefix import PrefixCache, common_prefix_length, pad_right

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ActivationStore", "collect_activations", "tokenize_completion"]

STORE_FORMAT_VERSION = 1
_SHARD_BYTES = 1 << 30  # at most ~1 GiB per safetensors shard
_INDEX_NAME = "index.safetensors"
_CHECKSUM = "blake2b"  # meta.json key and hashlib algorithm of the per-file checksums (faster than sha256 here)
_SITES = ("residual", "heads")
#: What ``collect_activations(dtype=...)`` accepts by name (``auto``: float16 unless it would overflow).
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ActivationStore:
    """Completion-token activations of every unique text, for the collected layers.

    ``acts``: ``(n_layers, n_tokens, d)`` 16-bit; the tokens of text ``i`` are rows
    ``offsets[i]:offsets[i+1]``. ``pairs``: ``(n_pairs, 2)`` text indices (positive, negative),
    with each pair's ``groups`` (source question) and ``splits``. ``texts`` holds
    ``(prompt, completion)`` per text so the pairs can be rebuilt.
    """

    acts: torch.Tensor
    layers: list[int]
    offsets: torch.Tensor
    pairs: torch.Tensor
    groups: torch.Tensor
    splits: list[str | None]
    texts: list[tuple[str, str]]
    fingerprint: ModelFingerprint
    site: str = "residual"  #: ``residual`` (block outputs) or ``heads`` (attention output projection input)
    dtype_choice: str = ""  #: how the storage type was chosen, e.g. ``auto: bfloat16 (float16 overflows at layer 9)``

    @property
    def hidden_size(self) -> int:
        return self.acts.shape[-1]

    @property
    def n_tokens(self) -> int:
        return self.acts.shape[1]

    def nbytes(self) -> int:
        return self.acts.numel() * self.acts.element_size()

    def layer(self, layer: int) -> torch.Tensor:
        """Activations ``(n_tokens, d)`` of one model layer."""
        try:
            return self.acts[self.layers.index(layer)]
        except ValueError:
            raise HpreditError(f"layer {layer} was not collected (have {self.layers})") from None

    def token_pairs(self, pair_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows ``(pos_idx, neg_idx)`` pairing token j of each positive with token j of its
        negative, up to the shorter completion (the published HPR recipe)."""
        pairs = self.pairs if pair_mask is None else self.pairs[pair_mask]
        lengths = self.offsets[1:] - self.offsets[:-1]
        p_off, n_off = self.offsets[pairs[:, 0]], self.offsets[pairs[:, 1]]
        k = torch.minimum(lengths[pairs[:, 0]], lengths[pairs[:, 1]])
        owner = torch.repeat_interleave(torch.arange(len(pairs)), k)
        starts = torch.cumsum(k, 0) - k
        j = torch.arange(int(k.sum())) - starts[owner]
        return p_off[owner] + j, n_off[owner] + j

    def split_mask(self, name: str) -> torch.Tensor:
        return torch.tensor([s == name for s in self.splits], dtype=torch.bool)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``meta.json`` plus safetensors shards (one or more layers each, ≤ ~1 GiB), atomically."""
        per_layer = self.acts[0].numel() * self.acts.element_size()
        per_shard = max(1, _SHARD_BYTES // max(per_layer, 1))
        chunks = [list(range(i, min(i + per_shard, len(self.layers)))) for i in range(0, len(self.layers), per_shard)]
        with atomic_directory(directory) as tmp:
            shards = []
            for n, rows in enumerate(chunks):
                name = f"acts-{n:05d}-of-{len(chunks):05d}.safetensors"
                save_file({f"layer.{self.layers[r]}": self.acts[r].contiguous() for r in rows}, tmp / name)
                shards.append(name)
            save_file({"offsets": self.offsets, "pairs": self.pairs, "groups": self.groups}, tmp / _INDEX_NAME)
            meta = {
                "format": "hpredit-activations",
                "format_version": STORE_FORMAT_VERSION,
                "layers": self.layers,
                "dtype": str(self.acts.dtype).removeprefix("torch."),
                "shards": shards,
                "splits": self.splits,
                "texts": self.texts,
                "model": self.fingerprint.to_dict(),
                "site": self.site,
                "dtype_choice": self.dtype_choice,
                _CHECKSUM: {name: file_digest(tmp / name, _CHECKSUM) for name in [*shards, _INDEX_NAME]},
            }
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ActivationStore:
        """Read a store written by :meth:`save`, checking every entry of ``meta.json``, the checksum
        of every file and the shapes of every tensor; any problem is one :class:`HpreditError`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise HpreditError(f"activation store {directory} is missing (expected a directory written by collect)")
        meta = read_json(directory / "meta.json", "activation store")
        if meta.get("format") != "hpredit-activations" or meta.get("format_version") != STORE_FORMAT_VERSION:
            raise HpreditError(
                f"{directory} is not an hpredit activation store (format version {STORE_FORMAT_VERSION})"
            )
        where = f"activation store {directory}"
        fp, layers, shards = _check_meta(meta, where)
        _verify_checksums(directory, meta, [*shards, _INDEX_NAME], where)
        try:
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(load_file(directory / shard))
            index = load_file(directory / _INDEX_NAME)
            acts = torch.stack([tensors[f"layer.{i}"] for i in layers])
            offsets, pairs, groups = index["offsets"], index["pairs"], index["groups"]
        except (SafetensorError, OSError, KeyError, RuntimeError) as e:
            raise HpreditError(f"{where} is damaged: {e}") from None
        texts, splits = meta["texts"], meta["splits"]
        _check_index(offsets, pairs, groups, acts, len(texts), len(splits), where)
        if meta.get("dtype", _name(acts.dtype)) != _name(acts.dtype) or acts.dtype not in STORE_DTYPES.values():
            raise HpreditError(f"{where}: the activations are {_name(acts.dtype)}, meta.json says {meta.get('dtype')}")
        if meta.get("site", "residual") == "residual" and acts.shape[-1] != fp.hidden_size:
            raise HpreditError(
                f"{where}: activations of width {acts.shape[-1]} for a model of hidden size {fp.hidden_size}"
            )
        return cls(
            acts=acts,
            layers=layers,
            offsets=offsets,
            pairs=pairs,
            groups=groups,
            splits=list(splits),
            texts=[(t[0], t[1]) for t in texts],
            fingerprint=fp,
            site=meta.get("site", "residual"),
            dtype_choice=str(meta.get("dtype_choice", "")),
        )


def _check_meta(meta: dict, where: str) -> tuple[ModelFingerprint, list[int], list[str]]:
    """The fingerprint, layers and shard names of a store's ``meta.json``, every entry type-checked."""
    for key in ("model", "layers", "shards", "splits", "texts"):
        if key not in meta:
            raise HpreditError(f"{where}: meta.json has no {key!r} entry")
    try:
        fp = ModelFingerprint.from_dict(meta["model"])
    except HpreditError as e:
        raise HpreditError(f"{where}: meta.json 'model': {e}") from None
    layers = meta["layers"]
    problem = layer_list_problem(layers, fp.num_layers, "meta.json 'layers'", required=True)
    if problem is not None:
        raise HpreditError(f"{where}: {problem}")
    shards = meta["shards"]
    if not (isinstance(shards, list) and shards and all(isinstance(n, str) for n in shards)):
        raise HpreditError(f"{where}: meta.json 'shards' must be a non-empty list of file names")
    outside = [n for n in shards if n != Path(n).name or n in ("", ".", "..") or "\\" in n]
    if outside:
        raise HpreditError(f"{where}: shard {outside[0]!r} is not a file inside the store (refused)")
    splits = meta["splits"]
    if not (isinstance(splits, list) and all(s is None or s in SPLIT_NAMES for s in splits)):
        raise HpreditError(f"{where}: meta.json 'splits' must be a list of {', '.join(SPLIT_NAMES)} or null")
    texts = meta["texts"]
    if not (
        isinstance(texts, list)
        and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in texts)
    ):
        raise HpreditError(f"{where}: meta.json 'texts' must be a list of [prompt, completion] strings")
    if meta.get("site", "residual") not in _SITES:
        raise HpreditError(f"{where}: meta.json 'site' must be one of {', '.join(_SITES)}")
    return fp, list(layers), list(shards)


def _verify_checksums(directory: Path, meta: dict, names: list[str], where: str) -> None:
    """Compare each file with ``meta["blake2b"]`` (stores written before checksums existed have none)."""
    sums = meta.get(_CHECKSUM)
    if sums is None:
        return
    if not (isinstance(sums, dict) and all(isinstance(sums.get(n), str) for n in names)):
        raise HpreditError(f"{where}: meta.json '{_CHECKSUM}' must give a checksum for every file")
    for name in names:
        path = directory / name
        if not path.is_file():
            raise HpreditError(f"{where}: {name} is missing")
        if file_digest(path, _CHECKSUM) != sums[name]:
            raise HpreditError(
                f"{where}: {name} does not match its checksum in meta.json (damaged or edited after "
                "saving): collect the activations again"
            )


def _check_index(
    offsets: torch.Tensor,
    pairs: torch.Tensor,
    groups: torch.Tensor,
    acts: torch.Tensor,
    n_texts: int,
    n_splits: int,
    where: str,
) -> None:
    """Shapes and ranges of the index tensors against ``meta.json`` and the activations."""
    ok = (
        offsets.dim() == 1
        and len(offsets) == n_texts + 1
        and not offsets.dtype.is_floating_point
        and int(offsets[0]) == 0
        and bool((offsets[1:] >= offsets[:-1]).all())
        and int(offsets[-1]) == acts.shape[1]
    )
    if not ok:
        raise HpreditError(f"{where}: the text offsets do not match the {n_texts} texts and {acts.shape[1]} tokens")
    if not (
        pairs.dim() == 2
        and pairs.shape[1] == 2
        and not pairs.dtype.is_floating_point
        and bool(((pairs >= 0) & (pairs < n_texts)).all())
    ):
        raise HpreditError(f"{where}: the pair index must be (n_pairs, 2) text indices below {n_texts}")
    if len(pairs) != n_splits or tuple(groups.shape) != (len(pairs),):
        raise HpreditError(
            f"{where}: {len(pairs)} pairs but {n_splits} splits and {tuple(groups.shape)} groups "
            "(meta.json and index.safetensors disagree)"
        )


def tokenize_completion(tok: PreTrainedTokenizerBase, prompt: str, completion: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + completion`` and the index where the completion's tokens start.

    The prompt's tokens must be a prefix of the full text's tokens; where the tokenizer merges
    across the boundary, the completion starts at the first token that differs.
    """
    prompt_ids = tok(prompt, add_special_tokens=True).input_ids
    full_ids = tok(prompt + completion, add_special_tokens=True).input_ids
    start = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        start += 1
    return full_ids, start


@dataclass
class _Texts:
    """The unique ``(prompt, completion)`` texts of the pairs, tokenized, and each pair's two text indices."""

    texts: list[tuple[str, str]]
    encoded: list[tuple[list[int], int]]  # (token ids of prompt + completion, index of the first completion token)
    pair_rows: list[list[int]]


def _unique_texts(tok: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair]) -> _Texts:
    """Each distinct text once (pairs share completions), tokenized with its completion's start."""
    text_index: dict[tuple[str, str], int] = {}
    texts: list[tuple[str, str]] = []
    pair_rows = []
    for p in pairs:
        row = []
        for completion in (p.positive, p.negative):
            key = (p.prompt, completion)
            if key not in text_index:
                text_index[key] = len(texts)
                texts.append(key)
            row.append(text_index[key])
        pair_rows.append(row)
    encoded = []
    for prompt, completion in texts:
        ids, start = tokenize_completion(tok, prompt, completion)
        if start >= len(ids):
            raise HpreditError(f"completion {completion!r} has no tokens of its own after prompt {prompt[-40:]!r}")
        encoded.append((ids, start))
    return _Texts(texts, encoded, pair_rows)


def _check_lengths(data: _Texts, limit: int | None) -> None:
    """Every text fits the model's positions (a longer one would run past what the model was trained
    on, or fail inside it): refused before any forward pass, naming the longest."""
    if limit is None:
        return
    longest = max(range(len(data.encoded)), key=lambda i: len(data.encoded[i][0]))
    n = len(data.encoded[longest][0])
    if n > limit:
        prompt, completion = data.texts[longest]
        over = sum(len(ids) > limit for ids, _ in data.encoded)
        raise HpreditError(
            f"{over} text(s) are longer than the model's {limit} positions, the longest {n} tokens "
            f"(prompt {prompt[:30]!r}…, completion {completion[:30]!r}…): shorten them"
        )


def _store_dtype(dtype: str | torch.dtype | None, model: nn.Module) -> tuple[torch.dtype, bool]:
    """``(storage dtype to start with, auto)``: ``auto``/None starts with float16 (bfloat16 for a
    bfloat16 model) and may switch to bfloat16 where float16 would overflow."""
    if dtype is None or dtype == "auto":
        model_dtype = next(model.parameters()).dtype
        return (torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16), True
    if isinstance(dtype, torch.dtype):
        if dtype not in STORE_DTYPES.values():
            raise HpreditError(f"store dtype {dtype} is not supported: use auto, float16, bfloat16 or float32")
        return dtype, False
    if dtype not in STORE_DTYPES:
        raise HpreditError(f"unknown store dtype {dtype!r}: use auto, float16, bfloat16 or float32")
    return STORE_DTYPES[dtype], False


class _Buffer:
    """Completion-token rows per site and layer, kept compactly (16-bit) from the start.

    With ``auto``, a value beyond the float16 range switches the whole store to bfloat16 (the rows
    kept so far are converted; float16 values are exact in float32 and round once to bfloat16).
    """

    def __init__(self, sites: list[str], layers: list[int], n_texts: int, dtype: torch.dtype, auto: bool):
        self.layers, self.dtype, self.auto = layers, dtype, auto
        self.rows: dict[str, list[list[torch.Tensor | None]]] = {s: [[None] * n_texts for _ in layers] for s in sites}
        self.note = f"auto: {_name(dtype)}" if auto else f"{_name(dtype)} (requested)"

    def keep(
        self,
        site: str,
        captured: dict[int, torch.Tensor],
        batch: list[int],
        offset: int,
        encoded: list[tuple[list[int], int]],
    ) -> None:
        """Store the completion rows of ``batch`` from ``captured`` (the batch's inputs start at token ``offset``)."""
        for r, layer in enumerate(self.layers):
            h = captured[layer]
            for row, i in enumerate(batch):
                seq, start = encoded[i]
                piece = h[row, start - offset : len(seq) - offset].float()
                self._check_range(piece, layer)
                self.rows[site][r][i] = piece.to(self.dtype).cpu()

    def _check_range(self, piece: torch.Tensor, layer: int) -> None:
        if self.dtype == torch.float32 or piece.numel() == 0:
            return
        peak = piece.abs().max()
        if not torch.isfinite(peak):
            raise HpreditError(
                f"layer {layer} produced NaN or inf activations: the model overflows in its own dtype "
                "(load it in float32 or bfloat16)"
            )
        if self.dtype == torch.float16 and peak > torch.finfo(torch.float16).max:
            if not self.auto:
                raise HpreditError(
                    f"layer {layer} has activations beyond the float16 range ({float(peak):.3g}): "
                    "use store dtype auto or bfloat16"
                )
            self._switch(torch.bfloat16, f"auto: bfloat16 (float16 overflows at layer {layer})")

    def _switch(self, dtype: torch.dtype, note: str) -> None:
        self.dtype, self.note = dtype, note
        for per_layer in self.rows.values():
            for row in per_layer:
                for i, t in enumerate(row):
                    if t is not None:
                        row[i] = t.float().to(dtype)

    def share(self) -> None:
        """Under data parallelism, give every rank every rank's rows (each text ran on one rank).

        Where ``auto`` switched to bfloat16 on some rank, every row follows it, as in one process.
        """
        if not distributed.active():
            return
        mine = {
            s: [{i: t for i, t in enumerate(row) if t is not None} for row in rows] for s, rows in self.rows.items()
        }
        gathered = distributed.all_gather((mine, self.dtype, self.note))
        for theirs, _, _ in gathered:
            for s, rows in theirs.items():
                for r, filled in enumerate(rows):
                    for i, t in filled.items():
                        self.rows[s][r][i] = t
        notes = {dtype: note for _, dtype, note in reversed(gathered)}  # the first rank's note per dtype
        self.dtype = torch.bfloat16 if len(notes) > 1 else gathered[0][1]  # two dtypes: auto switched somewhere
        self.note = notes[self.dtype]
        for rows in self.rows.values():  # rows of ranks that had not switched
            for row in rows:
                for i, t in enumerate(row):
                    if t is not None and t.dtype != self.dtype:
                        row[i] = t.float().to(self.dtype)

    def assemble(self, site: str, offsets: torch.Tensor) -> torch.Tensor:
        """``(n_layers, n_tokens, d)`` of one site, freeing the rows as it goes."""
        per_layer = self.rows[site]
        rows = [[t for t in row if t is not None] for row in per_layer]  # every row is filled by now
        width = rows[0][0].shape[-1]
        acts = torch.empty((len(self.layers), int(offsets[-1]), width), dtype=self.dtype)
        for r in range(len(self.layers)):
            torch.cat(rows[r], out=acts[r])
            rows[r] = []
            per_layer[r] = []
        return acts


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run_on_prompt_caches(
    runner: nn.Module, data: _Texts, batch_size: int, pad_id: int, captured: dict[str, dict], buffer: _Buffer, bar
) -> None:
    """Each prompt's tokens run once (the prefix all prompts share, once overall); its completions
    run in right-padded batches on top of its KV cache."""
    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(data.texts):
        by_prompt.setdefault(prompt, []).append(i)
    # A prompt's tokens: up to the earliest completion start of its texts (the tokenizer may merge across it).
    prompt_ids = {p: data.encoded[m[0]][0][: min(data.encoded[i][1] for i in m)] for p, m in by_prompt.items()}
    shared_len = common_prefix_length(list(prompt_ids.values()))
    root = PrefixCache(runner, list(prompt_ids[data.texts[0][0]][:shared_len]))
    unit = -1  # (prompt, batch) units in a fixed order: each rank runs its share (data parallelism)
    for prompt, members in by_prompt.items():
        ids_of_prompt = prompt_ids[prompt]
        cache = None
        for b in range(0, len(members), batch_size):
            unit += 1
            if not distributed.owns(unit):
                continue
            if cache is None:
                cache = root.extend(ids_of_prompt[shared_len:])
            batch = members[b : b + batch_size]
            ids, mask = pad_right([data.encoded[i][0][len(ids_of_prompt) :] for i in batch], pad_id)
            cache.run(ids, mask)
            for site, got in captured.items():
                buffer.keep(site, got, batch, len(ids_of_prompt), data.encoded)
            bar.update(len(batch))


def _run_whole_texts(
    runner: nn.Module, data: _Texts, batch_size: int, pad_id: int, captured: dict[str, dict], buffer: _Buffer, bar
) -> None:
    """Whole texts in right-padded batches sorted by length; the forward stops after the last recorded block."""
    device = next(runner.parameters()).device
    order = sorted(range(len(data.texts)), key=lambda i: len(data.encoded[i][0]))
    for unit, b in enumerate(range(0, len(order), batch_size)):
        if not distributed.owns(unit):
            continue
        batch = order[b : b + batch_size]
        ids, mask = pad_right([data.encoded[i][0] for i in batch], pad_id)
        with contextlib.suppress(StopForward):
            runner(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        for site, got in captured.items():
            buffer.keep(site, got, batch, 0, data.encoded)
        bar.update(len(batch))


def _check_sites(site: str | Sequence[str]) -> list[str]:
    sites = [site] if isinstance(site, str) else list(site)
    bad_sites = [s for s in sites if s not in _SITES]
    if bad_sites or not sites:
        raise HpreditError(f"unknown activation site(s) {bad_sites or sites}: use residual or heads")
    return sites


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    chosen = check_layers(layers, n_layers)
    return list(range(n_layers)) if chosen is None else sorted(chosen)


def _checked_pairs(pairs: ContrastivePairs | Sequence[ContrastivePair], batch_size: int) -> list[ContrastivePair]:
    """The pairs as :class:`ContrastivePair` objects; refuses no pairs, then a bad batch size, before any work."""
    pairs = as_pairs(pairs)
    if not pairs:
        raise HpreditError("no contrastive pairs to collect activations for")
    if not is_int(batch_size) or batch_size < 1:
        raise HpreditError(f"batch size must be a positive integer, got {batch_size!r}")
    return pairs


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    pairs: ContrastivePairs | Sequence[ContrastivePair],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    dtype: str | torch.dtype | None = "auto",
    progress: bool = True,
    layers_path: str | None = None,
    prefix_cache: bool = True,
    site: str | Sequence[str] = "residual",
) -> ActivationStore | dict[str, ActivationStore]:
    """Run the frozen model once per unique text and keep the completion tokens' activations.

    Args:
        model: a causal LM (frozen; hooks are removed afterwards whatever happens).
        tok: its tokenizer.
        pairs: contrastive pairs: :class:`~hpredit.data.ContrastivePair` objects or
            ``(prompt, positive, negative)`` / ``(positive, negative)`` tuples of strings
            (:func:`hpredit.data.check_pairs` refuses degenerate ones). A text longer than the
            model's positions is refused before any forward pass.
        layers: block indices to keep (default: every decoder block).
        batch_size: texts per forward pass (one pass records every requested layer and site).
        dtype: storage type: ``"auto"`` (default: float16, or bfloat16 for a bfloat16 model, switching
            to bfloat16 when float16 would overflow; the choice is kept in ``dtype_choice`` and
            ``meta.json``), ``"float16"``, ``"bfloat16"``, ``"float32"`` or a ``torch.dtype``.
        progress: show a progress bar.
        layers_path: dotted path of the decoder blocks when they cannot be found automatically.
        prefix_cache: run the prompt of a text group once (the prefix all prompts share, such as a
            few-shot primer, once overall) and its completions, right-padded, on its KV cache
            (default); else whole texts, sorted by length and right-padded.
        site: ``"residual"`` (block outputs, what HPR and CAA edit), ``"heads"`` (the input of each
            attention output projection, ``(…, heads·head_dim)``, what ITI edits), or a list of both.

    Returns:
        An :class:`ActivationStore` (``acts``: ``(n_layers, n_tokens, d)``), or for a list of
        sites a dict ``{site: store}`` filled by one pass.

    Example:
        >>> from hpredit.data import ContrastivePair
        >>> pairs = [ContrastivePair("Q: Sky?\\nA:", " Blue.", " Green.")]
        >>> store = collect_activations(model, tok, pairs, layers=[0, 1], progress=False)
        >>> store.layers, store.acts.dtype, store.acts.shape[-1] == model.config.hidden_size
        ([0, 1], torch.float16, True)
    """
    sites = _check_sites(site)
    pairs = _checked_pairs(pairs, batch_size)
    path, blocks = decoder_layers(model, layers_path)
    layers = _check_layers(layers, len(blocks))
    start_dtype, auto = _store_dtype(dtype, model)
    data = _unique_texts(tok, pairs)
    _check_lengths(data, max_positions(model))
    buffer = _Buffer(sites, layers, len(data.texts), start_dtype, auto)
    _run_recording(
        model, backbone(model, path), tok, data, sites, layers, layers_path, prefix_cache, batch_size, buffer, progress
    )
    buffer.share()
    stores = _stores(fingerprint(model, layers_path), pairs, data, buffer, sites, layers)
    return stores[sites[0]] if isinstance(site, str) else stores


def _run_recording(
    model: nn.Module,
    runner: nn.Module,
    tok: PreTrainedTokenizerBase,
    data: _Texts,
    sites: list[str],
    layers: list[int],
    layers_path: str | None,
    prefix_cache: bool,
    batch_size: int,
    buffer: _Buffer,
    progress: bool,
) -> None:
    """Run every unique text once (this rank's share) with the sites' recorders on; into ``buffer``."""
    bar = distributed.progress(len(data.texts), "collecting activations", unit="text", disable=not progress)
    with distributed.step("collecting activations"), contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        captured = {
            s: stack.enter_context(record(model, layers, s, layers_path, stop=not prefix_cache and s == sites[-1]))
            for s in sites
        }
        run = _run_on_prompt_caches if prefix_cache else _run_whole_texts
        run(runner, data, batch_size, pad_token_id(tok), captured, buffer, bar)


def _stores(
    fp: ModelFingerprint, pairs: list[ContrastivePair], data: _Texts, buffer: _Buffer, sites: list[str], layers
) -> dict[str, ActivationStore]:
    """One store per site: the completion tokens' activations with the texts' offsets and the pairs."""
    lengths = torch.tensor([len(ids) - start for ids, start in data.encoded])
    offsets = torch.zeros(len(data.texts) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    return {
        s: ActivationStore(
            acts=buffer.assemble(s, offsets),
            layers=layers,
            offsets=offsets,
            pairs=torch.tensor(data.pair_rows, dtype=torch.long),
            groups=torch.tensor([p.group for p in pairs], dtype=torch.long),
            splits=[p.split for p in pairs],
            texts=data.texts,
            fingerprint=fp,
            site=s,
            dtype_choice=buffer.note,
        )
        for s in sites
    }
