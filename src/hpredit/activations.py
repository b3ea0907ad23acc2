"""Collecting residual-stream activations of contrastive completions, and storing them compactly."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .artifacts import atomic_directory, read_json
from .data import ContrastivePair, ContrastivePairs
from .errors import HpreditError
from .models import ModelFingerprint, attention_output, backbone, decoder_layers, fingerprint
from .prefix import PrefixCache, common_prefix_length, pad_right

__all__ = ["ActivationStore", "collect_activations", "tokenize_completion"]

STORE_FORMAT_VERSION = 1
_SHARD_BYTES = 1 << 30  # at most ~1 GiB per safetensors shard


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
            save_file(
                {"offsets": self.offsets, "pairs": self.pairs, "groups": self.groups}, tmp / "index.safetensors"
            )
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
            }
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ActivationStore:
        directory = Path(directory)
        meta = read_json(directory / "meta.json", "activation store")
        if meta.get("format") != "hpredit-activations" or meta.get("format_version") != STORE_FORMAT_VERSION:
            raise HpreditError(f"{directory} is not an hpredit activation store (format version {STORE_FORMAT_VERSION})")
        try:
            tensors: dict[str, torch.Tensor] = {}
            for shard in meta["shards"]:
                tensors.update(load_file(directory / shard))
            index = load_file(directory / "index.safetensors")
            acts = torch.stack([tensors[f"layer.{i}"] for i in meta["layers"]])
        except (SafetensorError, OSError, KeyError, RuntimeError) as e:
            raise HpreditError(f"activation store {directory} is damaged: {e}") from None
        return cls(
            acts=acts,
            layers=list(meta["layers"]),
            offsets=index["offsets"],
            pairs=index["pairs"],
            groups=index["groups"],
            splits=list(meta["splits"]),
            texts=[tuple(t) for t in meta["texts"]],
            fingerprint=ModelFingerprint.from_dict(meta["model"]),
            site=meta.get("site", "residual"),
        )


def tokenize_completion(tok, prompt: str, completion: str) -> tuple[list[int], int]:
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


class _Stop(Exception):
    pass


@torch.no_grad()
def collect_activations(
    model,
    tok,
    pairs: ContrastivePairs | Sequence[ContrastivePair],
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    layers_path: str | None = None,
    prefix_cache: bool = True,
    site: str | Sequence[str] = "residual",
) -> ActivationStore | dict[str, ActivationStore]:
    """Run the frozen model once per unique text and keep the completion tokens' block outputs.

    All requested ``layers`` (default: every decoder block) come from one forward pass per batch.
    With ``prefix_cache`` (default) the prompt shared by a text group is computed once (and the
    prefix shared by all prompts, such as a few-shot primer, once overall) and the completions run
    on top of its KV cache, right-padded; without it, whole texts run sorted by length, right-padded.
    ``dtype``: storage type, default float16 (bfloat16 for a bfloat16 model). ``site``:
    ``residual`` (block outputs, what HPR and CAA edit), ``heads`` (the input of each attention
    output projection, ``(…, heads·head_dim)``, what ITI edits), or a list of both: then one pass
    collects all of them and a dict ``{site: store}`` is returned.
    """
    sites = [site] if isinstance(site, str) else list(site)
    bad_sites = [s for s in sites if s not in ("residual", "heads")]
    if bad_sites or not sites:
        raise HpreditError(f"unknown activation site(s) {bad_sites or sites}: use residual or heads")
    pairs = list(pairs)
    if not pairs:
        raise HpreditError("no contrastive pairs to collect activations for")
    path, blocks = decoder_layers(model, layers_path)
    n_layers = len(blocks)
    layers = list(range(n_layers)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise HpreditError(f"layers {bad or layers} out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    if dtype is None:
        dtype = torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float16

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

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    chunks = {s: [[None] * len(texts) for _ in layers] for s in sites}
    captured: dict[tuple[str, int], torch.Tensor] = {}
    last = layers[-1]

    def output_hook(i):
        def hook(_module, _args, output):
            if "residual" in sites:
                captured["residual", i] = output[0] if isinstance(output, tuple) else output
            if i == last and not prefix_cache:
                raise _Stop

        return hook

    def input_hook(i):
        def hook(_module, args):
            captured["heads", i] = args[0]

        return hook

    def keep(batch: list[int], offset: int) -> None:
        """Store the completion rows of ``batch`` from the captured outputs (inputs start at ``offset``)."""
        for s in sites:
            for r, layer in enumerate(layers):
                h = captured[s, layer]
                for row, i in enumerate(batch):
                    seq, start = encoded[i]
                    piece = h[row, start - offset : len(seq) - offset].float()
                    if dtype == torch.float16 and piece.abs().max() > torch.finfo(torch.float16).max:
                        raise HpreditError(f"layer {layer} has activations beyond the float16 range: "
                                           "collect with dtype=torch.bfloat16")
                    chunks[s][r][i] = piece.to(dtype).cpu()  # stored compactly from the start

    handles = [blocks[i].register_forward_hook(output_hook(i)) for i in layers]
    if "heads" in sites:
        handles += [attention_output(blocks[i]).register_forward_pre_hook(input_hook(i)) for i in layers]
    runner = backbone(model, path)
    device = next(model.parameters()).device
    bar = tqdm(total=len(texts), desc="collecting activations", unit="text", disable=not progress)
    try:
        if prefix_cache:
            by_prompt: dict[str, list[int]] = {}
            for i, (prompt, _) in enumerate(texts):
                by_prompt.setdefault(prompt, []).append(i)
            heads = {g: encoded[m[0]][0][: min(encoded[i][1] for i in m)] for g, m in by_prompt.items()}
            shared = common_prefix_length(list(heads.values()))
            root = PrefixCache(runner, list(heads[texts[0][0]][:shared]))
            for g, members in by_prompt.items():
                head = heads[g]
                cache = root.extend(head[shared:])
                for b in range(0, len(members), batch_size):
                    batch = members[b : b + batch_size]
                    ids, mask = pad_right([encoded[i][0][len(head):] for i in batch], pad_id)
                    captured.clear()
                    cache.run(ids, mask)
                    keep(batch, len(head))
                    bar.update(len(batch))
        else:
            order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                ids, mask = pad_right([encoded[i][0] for i in batch], pad_id)
                captured.clear()
                try:
                    runner(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Stop:
                    pass
                keep(batch, 0)
                bar.update(len(batch))
    finally:
        bar.close()
        for h in handles:
            h.remove()

    lengths = torch.tensor([len(ids) - start for ids, start in encoded])
    offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    stores = {}
    for s in sites:
        acts = torch.empty((len(layers), int(offsets[-1]), chunks[s][0][0].shape[-1]), dtype=dtype)
        for r in range(len(layers)):
            torch.cat(chunks[s][r], out=acts[r])
            chunks[s][r] = []  # free as we go
        stores[s] = ActivationStore(
            acts=acts,
            layers=layers,
            offsets=offsets,
            pairs=torch.tensor(pair_rows, dtype=torch.long),
            groups=torch.tensor([p.group for p in pairs], dtype=torch.long),
            splits=[p.split for p in pairs],
            texts=texts,
            fingerprint=fingerprint(model, layers_path),
            site=s,
        )
    return stores[sites[0]] if isinstance(site, str) else stores
