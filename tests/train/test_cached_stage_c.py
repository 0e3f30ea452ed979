"""Stage C from a latent cache (data=cached): real `wurst-data cache` output read by a real Stage C run.

The text encoder is not built at all in that mode: the batches carry the text states and caption
dropout takes the cache's own empty-caption states (text_hidden_empty.npy), which are the encoder's ""
states; the export carries the encoder that made the cache. Before issue 17.5 Stage C built the
text encoder from its config in every mode (to encode "" for dropout), so a config that cannot build
stopped a cached run, and the export held that config's encoder rather than the cache's.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from wurst.data.cli import main as wurst_data
from wurst.data.latent_cache import EMPTY_TEXT, TEXT_ENCODER_CONFIG, TEXT_ENCODER_WEIGHTS
from wurst.data.shard_stream import CachedShardStream
from wurst.data.stream_loader import StreamLoader
from wurst.data.synthetic import write_synthetic_shards
from wurst.train.cascade_loading import load_text_encoder
from wurst.train.run_stage import build_module, train_stage
from wurst.train.stage_c_module import StageCModule

from .conftest import REPO, compose_train

CONF = REPO / "conf"
# A text encoder config that cannot be built: a cached run must never try.
UNBUILDABLE = "model.text_encoder_c._target_=wurst.models.text_encoder.NoSuchTextEncoder"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    """`wurst-data cache` over 32 synthetic samples with the tiny compressor and text encoder configs."""
    root = tmp_path_factory.mktemp("latent-cache")
    write_synthetic_shards(root / "images", num_samples=32, num_shards=2, resolution=96, seed=0, fail_fractions={})
    torch.manual_seed(0)
    code = wurst_data([
        "cache", "--shards", str(root / "images"), "--out", str(root / "cache"),
        "--compressor", str(CONF / "model" / "compressor" / "tiny.yaml"),
        "--text-encoder", str(CONF / "model" / "text_encoder" / "tiny.yaml"),
        "--resolution", "96", "--compressor-resolution", "96", "--filter", "none",
        "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
    ])
    assert code == 0
    return root / "cache"


def cached_overrides(cache: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "stage=c", "experiment=tiny", "data=cached", f"data.shards={cache}", "stage.module.compressor_export=null",
        "data.num_workers=0", "data.global_batch_size=4", "logger=csv", "callbacks.progress_bar=false",
        f"paths.output_dir={output_dir}", *extra,
    ]


def test_the_cache_records_the_empty_caption_states_of_its_text_encoder(latent_cache):
    encoder = load_text_encoder(latent_cache)  # the cache's record: config + weights of the tiny encoder
    with torch.no_grad():
        expected = encoder([""])[0][0]
    empty = torch.from_numpy(np.load(latent_cache / EMPTY_TEXT))
    assert empty.dtype == torch.float16 and empty.shape == (77, 64)
    torch.testing.assert_close(empty.float(), expected, rtol=2e-3, atol=2e-3)  # fp16 storage
    assert json.loads((latent_cache / "cache_info.json").read_text())["empty_text"] == EMPTY_TEXT


def test_a_cached_stage_c_run_never_builds_the_text_encoder(latent_cache, tmp_path, monkeypatch):
    from wurst.models.text_encoder import TextEncoder

    built = []
    init = TextEncoder.__init__

    def counting_init(self, *args, **kwargs):
        built.append(kwargs.get("model_name", args[0] if args else None))
        init(self, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "__init__", counting_init)
    cfg = compose_train(cached_overrides(latent_cache, tmp_path, UNBUILDABLE, "trainer.max_steps=3",
                                         "checkpoint_every=3", "diffusion.text_dropout=0.5"))
    train_stage(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "step-000000003.ckpt", map_location="cpu", weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if "text_encoder" in k]
    # The export carries the encoder that made the cache (built once, for the export, after training).
    assert built == ["tiny-clip-text"]
    export = run_dir / "export"
    ours, cache = load_file(str(export / TEXT_ENCODER_WEIGHTS)), load_file(str(latent_cache / TEXT_ENCODER_WEIGHTS))
    assert ours.keys() == cache.keys() and all(torch.equal(ours[k], cache[k]) for k in ours)
    assert json.loads((export / TEXT_ENCODER_CONFIG).read_text()) == json.loads(
        (latent_cache / TEXT_ENCODER_CONFIG).read_text()
    )


class Witness(L.Callback):
    """The conditioning and loss of every training step."""

    def __init__(self, module):
        self.conditioning, self.losses = [], []
        inputs, step = module.diffusion_inputs, module.diffusion_step

        def diffusion_inputs(batch):
            x0, cond, batch_size = inputs(batch)
            self.conditioning.append(cond["c"].detach().clone())
            return x0, cond, batch_size

        def diffusion_step(batch):
            loss = step(batch)
            self.losses.append(float(loss.detach()))
            return loss

        module.diffusion_inputs, module.diffusion_step = diffusion_inputs, diffusion_step


def fit(module, batches) -> Witness:
    witness = Witness(module)
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[witness])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return witness


def test_caption_dropout_from_the_cache_trains_as_dropout_through_the_encoder(latent_cache, tmp_path):
    """The same cached batches and steps, dropped captions conditioned on the cache's "" states (new) or on
    the encoder's "" (the path before 17.5, kept for image batches): same drops, same losses."""
    batches = [b for b in StreamLoader(CachedShardStream(str(latent_cache), 4, mode="finite", shuffle=False))][:8]
    cfg = compose_train(cached_overrides(latent_cache, tmp_path, UNBUILDABLE, "diffusion.text_dropout=0.5"))
    from_cache = build_module(cfg)
    assert from_cache.text_encoder is None and from_cache.text_from_cache
    # At initialisation Stage C's output ignores c (zero-initialised layers); give those layers small
    # weights, so that what a dropped step conditions on shows in the loss.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in from_cache.network.parameters():
            if not parameter.any():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))

    settings = {k: v for k, v in from_cache.hparams.items() if k not in ("text_from_cache", "cache_shards")}
    settings["text_encoder"] = json.loads((latent_cache / TEXT_ENCODER_CONFIG).read_text())
    through_encoder = StageCModule(**settings)
    through_encoder.text_encoder.load_state_dict(load_file(str(latent_cache / TEXT_ENCODER_WEIGHTS)))
    missing, unexpected = through_encoder.load_state_dict(from_cache.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("text_encoder.") for k in missing)

    wrong_empty = build_module(cfg)  # the witness that the "" states matter: zeros in their place
    wrong_empty.load_state_dict(from_cache.state_dict())
    wrong_empty.empty_text = torch.zeros_like(wrong_empty.empty_text)

    new, old, wrong = fit(from_cache, batches), fit(through_encoder, batches), fit(wrong_empty, batches)
    empty = from_cache.empty_text.float()
    dropped = [bool((c == empty).all()) for c in new.conditioning]
    assert 0 < sum(dropped) < len(batches)  # both kinds of step occur (text_dropout 0.5, seeded steps)
    for c_new, c_old, drop in zip(new.conditioning, old.conditioning, dropped):
        if drop:  # fp16 cache vs fp32 encoder: the rounding the cached per-sample states have too
            torch.testing.assert_close(c_new, c_old, rtol=2e-3, atol=2e-3)
        else:
            assert torch.equal(c_new, c_old)
    assert new.losses == pytest.approx(old.losses, rel=1e-5, abs=0)
    # ...while zeros for the "" states move the loss of a dropped step 100x further than the fp16 rounding
    first = dropped.index(True)
    assert abs(wrong.losses[first] - new.losses[first]) > 100 * abs(old.losses[first] - new.losses[first]) + 1e-6
    print(f"\ndropped steps {dropped}; losses (cache) {new.losses}; (encoder) {old.losses}")


@pytest.mark.slow
def test_previews_of_a_cached_run_draw_with_the_caches_text_encoder_loaded_once(
    latent_cache, tiny_pipeline_dir, tmp_path, monkeypatch
):
    """The text encoder is built only when a preview (or the export) needs it, from the cache's record."""
    from wurst.models.text_encoder import TextEncoder

    built = []
    init = TextEncoder.__init__
    monkeypatch.setattr(TextEncoder, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    cfg = compose_train(cached_overrides(latent_cache, tmp_path, UNBUILDABLE, "trainer.max_steps=2",
                                         "checkpoint_every=2",
                                         f"stage.module.compressor_export={tiny_pipeline_dir / 'stage_b' / 'export'}"))
    train_stage(cfg)
    assert sorted(p.name for p in (Path(cfg.run_dir) / "samples").glob("*.png")) == ["step-000000002.png"]
    # Stage B's text encoder (the cascade's, for the preview) + the cache's Stage C encoder: once each.
    assert len(built) == 2


def test_a_cached_run_resumes_from_a_checkpoint_that_still_holds_the_text_encoder(latent_cache, tmp_path):
    """Checkpoints written before 17.5 (or by an image-fed run) carry the frozen text encoder's weights."""
    cfg = compose_train(cached_overrides(latent_cache, tmp_path, "trainer.max_steps=2", "checkpoint_every=2"))
    train_stage(cfg)
    checkpoint_path = Path(cfg.run_dir) / "checkpoints" / "step-000000002.ckpt"
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    encoder = load_text_encoder(latent_cache)
    checkpoint["state_dict"].update({f"text_encoder.{k}": v for k, v in encoder.state_dict().items()})
    old_style = tmp_path / "old-style.ckpt"
    torch.save(checkpoint, old_style)
    resumed = compose_train(cached_overrides(latent_cache, tmp_path / "resumed", "trainer.max_steps=3",
                                             "checkpoint_every=3", f"resume={old_style}"))
    train_stage(resumed)
    assert (Path(resumed.run_dir) / "checkpoints" / "step-000000003.ckpt").is_file()


def test_a_cache_of_a_pretrained_encoder_is_exported_by_name_without_loading_it(tmp_path, monkeypatch):
    """The paper's case (CLIP bigG): the export names the encoder the cache recorded; nothing is loaded."""
    from wurst.models.text_encoder import TextEncoder

    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / EMPTY_TEXT, np.zeros((77, 64), np.float16))
    record = {"_target_": "wurst.models.text_encoder.TextEncoder", "model_name": "ViT-bigG-14",
              "pretrained": "laion2b_s39b_b160k", "model_cfg": None, "context_length": 77, "pad_token_id": 49407}
    (cache / TEXT_ENCODER_CONFIG).write_text(json.dumps(record))
    monkeypatch.setattr(TextEncoder, "__init__", lambda *a, **k: pytest.fail("a text encoder was built"))
    module = build_module(compose_train(cached_overrides(cache, tmp_path, UNBUILDABLE)))
    assert module.export_files()[TEXT_ENCODER_CONFIG] == record and module.export_networks() == {}


def test_cached_stage_c_trains_under_bf16_mixed_with_fp32_weights_and_exports_the_ema(latent_cache, tmp_path):
    """The GPU recipe's precision on the CPU (issue 18): the cached batches are fp16 states, the step
    autocasts to bf16, and the weights, EMA and export stay fp32."""
    import math

    cfg = compose_train(cached_overrides(latent_cache, tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=3",
                                         "checkpoint_every=3", "ema.start=0", "ema.every=1"))
    metrics = train_stage(cfg)
    assert math.isfinite(metrics["train/loss"])
    run_dir = Path(cfg.run_dir)
    state = torch.load(run_dir / "checkpoints" / "step-000000003.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    ema = {k.removeprefix("ema.shadow."): v for k, v in state.items() if k.startswith("ema.shadow.")}
    export = load_file(str(run_dir / "export" / "model.safetensors"))
    assert ema and export.keys() == ema.keys() and all(torch.equal(export[k], ema[k]) for k in ema)
