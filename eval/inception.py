"""FID and Inception Score through torchmetrics, with the Inception weights from a local file.

Both use torch-fidelity's ``FeatureExtractorInceptionV3`` (via torchmetrics' ``NoTrainInceptionV3``):
the TF-Inception-2015 network that FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined
with. Without a path it downloads ``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's
GitHub release; offline clusters copy that file once and pass its path, or a folder holding it.

Images enter as uint8 ``[B, 3, H, W]``; the extractor resizes to 299² itself. ``antialias=False``
keeps the original TF-style bilinear resize (torch-fidelity, pytorch-fid); torchmetrics' own default
(True) gives slightly different numbers.
"""

from __future__ import annotations

from pathlib import Path

from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_FEATURES = (64, 192, 768, 2048)
IS_FEATURES = ("logits_unbiased", 64, 192, 768, 2048)


def resolve_inception_weights(weights: str | Path | None) -> str | None:
    """A weights file, a folder holding :data:`INCEPTION_WEIGHTS_FILE` (or one ``.pth``), or None."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.is_dir():
        candidates = [path / INCEPTION_WEIGHTS_FILE] if (path / INCEPTION_WEIGHTS_FILE).is_file() else []
        candidates = candidates or sorted(path.glob("*.pth"))
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"Inception weights folder {path} should hold {INCEPTION_WEIGHTS_FILE} "
                "(or exactly one .pth); "
                f"found {[p.name for p in candidates]}"
            )
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {path} do not exist; download {INCEPTION_WEIGHTS_FILE} from torch-fidelity's "
            "v0.2.0 GitHub release and pass its path (or null to download at run time)"
        )
    return str(path)


def build_fid(
    weights: str | Path | None = None, feature: int = 2048, antialias: bool = False
) -> FrechetInceptionDistance:
    """torchmetrics FID over Inception pool features (``feature`` = 2048 for the standard protocol).

    ``update(images uint8 [B, 3, H, W], real=True|False)``; ``compute()`` → scalar.
    """
    if feature not in FID_FEATURES:
        raise ValueError(f"FID feature must be one of {FID_FEATURES} (2048 is the standard), got {feature!r}")
    return FrechetInceptionDistance(
        feature=feature,
        feature_extractor_weights_path=resolve_inception_weights(weights),
        antialias=antialias,
        normalize=False,
    )


def build_inception_score(
    weights: str | Path | None = None,
    feature: str | int = "logits_unbiased",
    splits: int = 10,
    antialias: bool = False,
) -> InceptionScore:
    """torchmetrics IS over Inception's class logits (``splits`` = 10 as in Salimans et al.).

    ``update(images uint8 [B, 3, H, W])``; ``compute()`` → (mean, std) over the splits.
    """
    if feature not in IS_FEATURES:
        raise ValueError(f"Inception Score feature must be one of {IS_FEATURES}, got {feature!r}")
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"Inception Score splits must be a positive int, got {splits!r}")
    # torchmetrics' InceptionScore has no weights-path argument: build its extractor ourselves.
    extractor = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(feature)],
        feature_extractor_weights_path=resolve_inception_weights(weights),
        antialias=antialias,
    )
    return InceptionScore(feature=extractor, splits=splits, normalize=False)
