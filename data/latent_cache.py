"""The latent cache: run Stage C's frozen encoders once, so Stage C trains without images.

Stage C conditions on frozen text states and learns the frozen compressor's latents, so both can be
computed once per sample instead of once per epoch (REFERENCE.md: Stage C saw ~1.42 B samples).
``cache_shards`` reads the image shards in order (LAION filter and centre crop as configured), runs
the semantic compressor on the compressor-resolution crop and the text encoder on the caption, and
writes one output shard per input shard, same name, members per sample::

    <key>.compressor_latents.npy   fp16 [16, h, w]   the compressor's BatchNorm output z (unscaled)
    <key>.text_hidden.npy          fp16 [77, D]      per-token text states after ln_final
    <key>.txt                      the cleaned caption

plus, in the output folder, ``text_hidden_empty.npy`` (fp16 [77, D], the empty caption's states: what
Stage C's classifier-free-guidance dropout conditions on when it trains from the cache, so it never
builds the text encoder), the text encoder that made the states (``text_encoder_config.json``, and for
an encoder without pretrained weights, e.g. the tiny one, ``text_encoder.safetensors``: a stage export's
file names, so Stage C's export and previews use this very encoder) and ``cache_info.json``. A shard is written to a temporary name and renamed when
complete, so a rerun skips finished shards and redoes a half-written one: caching is resumable.
Ranks (RANK/WORLD_SIZE or SLURM) take disjoint shards. The encoders come from Hydra-style configs
(``_target_`` plus arguments), so this package never imports the models.

A cache fixes each image's crop (centred); training from images draws random crops instead.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wurst.data.data_stats import DataStats
from wurst.data.laion_filter import LAIONFilter
from wurst.data.shard_spec import expand_shards
from wurst.data.shard_stream import ImageShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.topology import rank_and_world_size

log = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
EMPTY_TEXT = "text_hidden_empty.npy"
TEXT_ENCODER_CONFIG = "text_encoder_config.json"
TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"


def encoder_config(spec: str | os.PathLike | Mapping[str, Any]) -> DictConfig:
    """A Hydra-style ``_target_`` config from a yaml/json file path, a yaml/json string, or a mapping."""
    if isinstance(spec, Mapping):
        config = OmegaConf.create(dict(spec))
    elif Path(spec).is_file():
        config = OmegaConf.load(spec)  # json is yaml
    else:
        try:
            config = OmegaConf.create(str(spec))
        except Exception as error:
            raise ValueError(f"encoder config {spec!r} is neither an existing yaml/json file nor a "
                             f"yaml/json mapping ({error})") from error
    if not isinstance(config, DictConfig) or "_target_" not in config:
        raise ValueError(f"encoder config {spec!r} has no _target_; give e.g. conf/model/compressor/tiny.yaml "
                         "or a Stage B export's compressor_config.json")
    return config


def load_encoder(spec: str | os.PathLike | Mapping[str, Any], weights: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """Instantiate a frozen (eval, no grads) encoder; ``weights``: a safetensors state dict to load."""
    module = instantiate(encoder_config(spec))
    if not isinstance(module, nn.Module):
        raise TypeError(f"encoder config {spec!r} built a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise FileNotFoundError(f"encoder weights {weights} do not exist; for the compressor use Stage B's "
                                    "export/compressor.safetensors (train Stage B first: wurst-train stage=b)")
        module.load_state_dict(load_file(str(weights)), strict=True)
    return module.eval().requires_grad_(False).to(device)


def _output_name(url: str) -> str:
    """The cached shard's file name: the source shard's (for ``pipe:``, the command's ``*.tar`` word)."""
    words = url.removeprefix("pipe:").split() if url.startswith("pipe:") else [url]
    names = [w.split("?")[0].rstrip("/").rsplit("/", 1)[-1] for w in words]
    tars = [n for n in names if n.endswith(".tar")]
    if url.startswith("pipe:") and not tars:
        raise ValueError(f"latent cache: cannot name the output of {url!r}: no *.tar word in the command")
    return tars[-1] if tars else names[-1] + ".tar"


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.numpy(), allow_pickle=False)
    return buffer.getvalue()


def _save_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_text_encoder_record(out: Path, text_encoder: nn.Module, config: Mapping[str, Any]) -> None:
    """The cache's text encoder as a stage export holds one: its config, and its weights when the config
    names no pretrained weights (a randomly initialised encoder cannot be rebuilt from its config)."""
    if not config.get("pretrained"):
        from safetensors.torch import save_file

        tmp = out / f".{TEXT_ENCODER_WEIGHTS}.tmp-{os.getpid()}"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in text_encoder.state_dict().items()}, str(tmp))
        os.replace(tmp, out / TEXT_ENCODER_WEIGHTS)
    _save_atomic(out / TEXT_ENCODER_CONFIG, json.dumps(dict(config), indent=1).encode())


def cache_folder(shards: str | os.PathLike | Sequence[str]) -> Path:
    """The local folder of a cache given as Stage C's ``data.shards`` (the folder, or a pattern or list of
    its shards): where ``text_hidden_empty.npy`` and the text encoder's record lie."""
    if isinstance(shards, (str, os.PathLike)) and Path(shards).is_dir():
        return Path(shards)
    urls = expand_shards(shards if isinstance(shards, (str, Sequence)) else str(shards))
    folders = {Path(u).parent for u in urls if "://" not in u and not u.startswith("pipe:")}
    if len(folders) != 1 or len(folders) != len({Path(u).parent for u in urls}):
        raise ValueError(
            f"data.shards={shards!r}: Stage C reads the cache's {EMPTY_TEXT} beside its shards, so the shards "
            "must be in one local folder (the `wurst-data cache --out` folder); copy the cache there"
        )
    return folders.pop()


def read_empty_text_states(folder: str | os.PathLike) -> torch.Tensor:
    """The cache's empty-caption states, fp16 ``[77, D]``: what caption dropout conditions on."""
    path = Path(folder) / EMPTY_TEXT
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: Stage C's caption dropout trains on the cache's empty-caption states; "
            f"rerun `wurst-data cache --out {folder} ...` (it writes {EMPTY_TEXT} first; finished shards are kept)"
        )
    try:
        states = torch.from_numpy(np.load(path, allow_pickle=False))
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable .npy file ({error}); delete it and rerun `wurst-data cache "
                         f"--out {folder} ...`") from error
    if states.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {tuple(states.shape)}, not the [77, D] text states of "
                         f"one caption; rerun `wurst-data cache --out {folder} ...`")
    return states


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


@torch.no_grad()
def encode_batch(batch: Mapping[str, Any], compressor: nn.Module, text_encoder: nn.Module,
                 device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressor latents [B, 16, h, w], text states [B, 77, D]) for an image batch, as fp16 on the CPU."""
    if "compressor_images" not in batch:
        raise ValueError("latent cache: batches have no compressor_images; set a compressor_resolution")
    latents = compressor(batch["compressor_images"].to(device))
    hidden, _pooled = text_encoder(list(batch["captions"]))
    if latents.ndim != 4 or hidden.ndim != 3 or len(latents) != len(hidden):
        raise ValueError(f"latent cache: encoders returned latents {tuple(latents.shape)} and text states "
                         f"{tuple(hidden.shape)}; expected [B, 16, h, w] and [B, 77, D]")
    return latents.to("cpu", torch.float16), hidden.to("cpu", torch.float16)


def cache_shards(source: str | Sequence[str], out_dir: str | os.PathLike,
                 compressor: str | os.PathLike | Mapping[str, Any] | nn.Module,
                 text_encoder: str | os.PathLike | Mapping[str, Any] | nn.Module,
                 compressor_weights: str | os.PathLike | None = None, resolution: int = 512,
                 compressor_resolution: int = 384, laion_filter: LAIONFilter | None = None,
                 batch_size: int = 32, num_workers: int = 2, device: str | None = None,
                 reject_all_check: int = 1000) -> dict[str, Any]:
    """Write cached shards for ``source`` into ``out_dir``; returns a summary (shards done, counts).

    compressor / text_encoder: configs (see :func:`encoder_config`) or already-built modules.
    resolution / compressor_resolution / laion_filter: as the image stream Stage C would otherwise read.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    urls = expand_shards(source)
    names = [_output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("latent cache: two source shards share a file name, so their outputs would collide; "
                         "cache them into separate output folders")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = rank_and_world_size()
    mine = list(zip(urls, names))[rank::world_size]
    todo = {u: n for u, n in mine if not (out / n).is_file()}
    summary: dict[str, Any] = {"rank": rank, "shards_assigned": len(mine), "shards_already_done": len(mine) - len(todo)}
    if not isinstance(compressor, nn.Module):
        compressor = load_encoder(compressor, compressor_weights, device)
    text_config = None
    if not isinstance(text_encoder, nn.Module):
        text_config = OmegaConf.to_container(encoder_config(text_encoder), resolve=True)
        text_encoder = load_encoder(text_encoder, None, device)

    if rank == 0:
        with torch.no_grad():
            empty, _ = text_encoder([""])
        _save_atomic(out / EMPTY_TEXT, _npy(empty[0].to("cpu", torch.float16)))
        if text_config is not None:
            write_text_encoder_record(out, text_encoder, text_config)
        info = {"source": source if isinstance(source, str) else list(source), "num_shards": len(urls),
                "resolution": resolution, "compressor_resolution": compressor_resolution, "dtype": "float16",
                "filter": None if laion_filter is None else laion_filter.describe(),
                "members": ["compressor_latents.npy", "text_hidden.npy", "txt"], "empty_text": EMPTY_TEXT,
                "text_encoder": text_config}
        (out / CACHE_INFO).write_text(json.dumps(info, indent=1))
    stats = DataStats()
    if todo:
        stream = ImageShardStream(list(todo), batch_size, resolution=resolution,
                                  compressor_resolution=compressor_resolution, random_crop=False,
                                  laion_filter=laion_filter, reject_all_check=reject_all_check, mode="finite",
                                  shuffle=False, shard_ends=True)
        # This rank already took its shards; its workers split them among themselves only.
        loader = StreamLoader(stream, num_workers=min(num_workers, len(todo)), stats=stats, placement=(0, 1))
        open_shards: dict[str, tuple[tarfile.TarFile, Path]] = {}

        def shard_tar(url: str) -> tarfile.TarFile:
            if url not in open_shards:
                tmp = out / (todo[url] + f".tmp{rank}")
                # open across batches until the shard's end marker; closed below in every case
                open_shards[url] = (tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT), tmp)  # noqa: SIM115
            return open_shards[url][0]

        for batch in loader:
            if "shard_end" in batch:
                tar = shard_tar(batch["shard_end"])  # also for a shard with no kept sample: mark it done
                tar.close()
                os.replace(open_shards.pop(batch["shard_end"])[1], out / todo[batch["shard_end"]])
                continue
            latents, hidden = encode_batch(batch, compressor, text_encoder, device)
            tar = shard_tar(batch["shard"])
            for i, key in enumerate(batch["keys"]):
                _add_member(tar, f"{key}.compressor_latents.npy", _npy(latents[i]))
                _add_member(tar, f"{key}.text_hidden.npy", _npy(hidden[i]))
                _add_member(tar, f"{key}.txt", batch["captions"][i].encode())
        for tar, tmp in open_shards.values():  # shards whose end never came (unreadable): not marked done
            tar.close()
            tmp.unlink(missing_ok=True)
    summary.update(shards_written=len(todo), counts=dict(stats.counts))
    log.info("latent cache: %s", summary)
    return summary
