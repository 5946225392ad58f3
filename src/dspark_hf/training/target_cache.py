"""Offline target cache: the frozen target's features, computed once and stored as safetensors shards.

Online training (the default) runs the target on every batch. Users who train many epochs over the same data can
run it once instead: [`build_target_cache`] stores, per example, the concatenated features of the draft's
`target_layer_ids` `(S, m·d)` and the target's final-norm hidden states `(S, d)` (the LM head's input, from which the
target's logits at block positions are recomputed). [`TargetCacheDataset`] serves them next to the tokens, the
collator pads them, and [`compute_dspark_loss`] then skips the target forward.

Layout of a cache folder: `target_cache.json` (layer ids, dtype, example lengths, a fingerprint of the tokens,
finished shards) and `shard-00000.safetensors`, … with tensors `features.<i>` and `final_hidden.<i>` for the
examples `i` of each shard. Building is resumable: finished shards are kept and skipped.
"""

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import PreTrainedModel
from transformers.utils import logging

from .collator import DSparkDataCollator

logger = logging.get_logger(__name__)

__all__ = ["TargetCacheDataset", "build_target_cache", "load_target_cache_info"]

CACHE_INFO_NAME = "target_cache.json"
CACHE_FORMAT_VERSION = 1


def _token_fingerprint(dataset) -> str:
    digest = hashlib.sha256()
    for ids in dataset["input_ids"]:
        digest.update(torch.as_tensor(list(ids), dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _num_shards(num_examples: int, shard_size: int) -> int:
    return -(-num_examples // shard_size)


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def load_target_cache_info(cache_dir: str | os.PathLike) -> dict:
    """The `target_cache.json` of a cache folder (raises `FileNotFoundError` with the fix when absent)."""
    path = Path(cache_dir) / CACHE_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No target cache at {cache_dir} ({CACHE_INFO_NAME} missing). Build one with "
            "`dspark-hf cache-features` or dspark_hf.training.build_target_cache(target, dataset, layer_ids, dir)."
        )
    return json.loads(path.read_text())


def _write_info(cache_dir: Path, info: dict) -> None:
    tmp = cache_dir / (CACHE_INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, cache_dir / CACHE_INFO_NAME)


@torch.no_grad()
def build_target_cache(
    target: PreTrainedModel,
    dataset,
    target_layer_ids: Sequence[int],
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    shard_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> Path:
    """Runs `target` once over every example of `dataset` and stores its features as safetensors shards.

    Args:
        target: the frozen target causal LM (any transformers model returning `hidden_states`).
        dataset: tokenized examples with `input_ids` (e.g. from `load_training_dataset`), in the order training
            will index them.
        target_layer_ids: the draft's `config.target_layer_ids`.
        cache_dir: output folder; an interrupted build resumes from its finished shards.
        batch_size: examples per target forward (sorted by length inside a shard to limit padding).
        shard_size: examples per shard file.
        dtype: storage dtype of the features (bf16 halves the disk footprint of fp32).
        progress: show a progress bar.

    Returns:
        The cache folder.
    """
    from .base_trainer import run_target

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    info = {
        "format_version": CACHE_FORMAT_VERSION,
        "target": getattr(target, "name_or_path", None) or type(target).__name__,
        "target_layer_ids": [int(i) for i in target_layer_ids],
        "hidden_size": int(target.config.get_text_config().hidden_size),
        "dtype": str(dtype).replace("torch.", ""),
        "num_examples": len(lengths),
        "lengths": lengths,
        "fingerprint": _token_fingerprint(dataset),
        "shard_size": int(shard_size),
        "finished_shards": [],
    }
    info_path = cache_dir / CACHE_INFO_NAME
    if info_path.is_file():
        previous = load_target_cache_info(cache_dir)
        keys = ("target_layer_ids", "hidden_size", "dtype", "fingerprint", "shard_size")
        if any(previous.get(k) != info[k] for k in keys):
            raise ValueError(
                f"{cache_dir} holds a target cache built with different settings or data "
                f"({', '.join(k for k in keys if previous.get(k) != info[k])} differ). "
                "Use a new cache_dir or delete the old one."
            )
        info["finished_shards"] = previous["finished_shards"]
    _write_info(cache_dir, info)

    num_shards = _num_shards(len(lengths), shard_size)
    pad_id = int(getattr(target.config, "pad_token_id", None) or 0)
    collator = DSparkDataCollator(pad_token_id=pad_id)
    device = next(target.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths), desc="Caching target features", unit="example")
        bar.update(min(len(lengths), len(info["finished_shards"]) * shard_size))
    for shard in range(num_shards):
        if shard in info["finished_shards"]:
            continue
        indices = range(shard * shard_size, min(len(lengths), (shard + 1) * shard_size))
        order = sorted(indices, key=lambda i: lengths[i])
        tensors: dict[str, torch.Tensor] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collator([{"input_ids": dataset[i]["input_ids"]} for i in chunk])
            features, final_hidden = run_target(
                target,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                list(target_layer_ids),
            )
            for row, i in enumerate(chunk):
                n = lengths[i]
                tensors[f"features.{i}"] = features[row, :n].to("cpu", dtype).contiguous()
                tensors[f"final_hidden.{i}"] = final_hidden[row, :n].to("cpu", dtype).contiguous()
            if bar is not None:
                bar.update(len(chunk))
        save_file(tensors, str(cache_dir / _shard_name(shard)), metadata={"format": "pt"})
        info["finished_shards"] = sorted(info["finished_shards"] + [shard])
        _write_info(cache_dir, info)
    if bar is not None:
        bar.close()
    return cache_dir


class TargetCacheDataset(Dataset):
    """Tokenized examples joined with their cached target features.

    Items are the dataset's `input_ids` / `loss_mask` (and `attention_mask` if present) plus `target_features`
    `(S, m·d)` and `target_final_hidden` `(S, d)` read lazily from the shards. [`DSparkDataCollator`] pads them and
    [`DSparkTrainer`] then trains without running the target.

    Args:
        dataset: the same tokenized dataset (same order) the cache was built from.
        cache_dir: a folder written by [`build_target_cache`].
        target_layer_ids: if given, checked against the cache's (pass the draft's `config.target_layer_ids`).
        indices: optional subset of example indices (see [`split`]).
    """

    def __init__(
        self,
        dataset,
        cache_dir: str | os.PathLike,
        target_layer_ids: Sequence[int] | None = None,
        indices: Sequence[int] | None = None,
    ):
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        self.info = load_target_cache_info(cache_dir)
        info = self.info
        missing = sorted(
            set(range(_num_shards(info["num_examples"], info["shard_size"]))) - set(info["finished_shards"])
        )
        if missing:
            raise ValueError(
                f"The target cache at {cache_dir} is incomplete ({len(missing)} shards missing); rerun "
                "build_target_cache / `dspark-hf cache-features` with the same arguments to finish it."
            )
        if info["num_examples"] != len(dataset) or info["fingerprint"] != _token_fingerprint(dataset):
            raise ValueError(
                f"The target cache at {cache_dir} was built from different data ({info['num_examples']} examples, "
                f"fingerprint {info['fingerprint']}) than the dataset given ({len(dataset)} examples). "
                "Rebuild the cache for this dataset."
            )
        if target_layer_ids is not None:
            self.check_target_layer_ids(target_layer_ids)
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        self._handles: dict[int, Any] = {}

    def check_target_layer_ids(self, target_layer_ids: Sequence[int]) -> None:
        """Raises `ValueError` unless the cache holds exactly these layers (pass the draft's `target_layer_ids`)."""
        if list(target_layer_ids) != self.info["target_layer_ids"]:
            raise ValueError(
                f"The target cache holds layers {self.info['target_layer_ids']} but the draft reads "
                f"{list(target_layer_ids)}. Rebuild the cache with the draft's config.target_layer_ids."
            )

    def __len__(self) -> int:
        return len(self.indices)

    def _tensor(self, name: str, index: int) -> torch.Tensor:
        shard = index // self.info["shard_size"]
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.cache_dir / _shard_name(shard)), framework="pt")
            self._handles[shard] = handle
        return handle.get_tensor(f"{name}.{index}")

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = self.indices[item]
        example = dict(self.dataset[index])
        example["target_features"] = self._tensor("features", index)
        example["target_final_hidden"] = self._tensor("final_hidden", index)
        return example

    def __getstate__(self) -> dict:  # safetensors handles do not pickle (dataloader workers reopen them)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def split(self, test_size: float, seed: int = 0) -> tuple["TargetCacheDataset", "TargetCacheDataset"]:
        """A seeded random (train, test) split sharing this cache."""
        if not 0 < test_size < 1:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
        generator = torch.Generator().manual_seed(seed)
        order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()]
        num_test = max(1, round(test_size * len(order)))
        return self._subset(order[num_test:]), self._subset(order[:num_test])

    def _subset(self, indices: list[int]) -> "TargetCacheDataset":
        """These examples of the same (already validated) dataset and cache."""
        subset = copy.copy(self)
        subset.indices, subset._handles = indices, {}
        return subset
