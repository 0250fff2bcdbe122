"""What classifier guidance at scale g can give with a given latent classifier, read on real test tiles, beside what a
pool generated with it was judged: separates what the latent classifier knows from what the diffusion model and the
sampler make of it.

At scale g, exact classifier guidance (paper Eq. 7) samples ``p_g(z | y) ~ p(z) p_phi(y | z)^g``. If the diffusion
model sampled the data's latent distribution ``p(z)``, the latents ``z_i = E(x_i)`` of the split's test tiles are a
sample of it, and the share of tiles of class ``c`` among draws requested as ``y`` is the self-normalised importance
estimate ``sum_i p_phi(y | z_i)^g [c_i = c] / sum_i p_phi(y | z_i)^g`` (the classifier read at t = 0). ``c_i`` is the
tile's true label ("true") or the judge's reading of ``D'(z_i)`` ("judged", what a pool's judged conditional accuracy
is compared with). With ``--balance`` the weights also carry the unconditional model's class balance: each test tile
is weighted by (the share of the judge's class among a g = 0 pool) / (its share among the judged ``D'(z_i)``).

A pool made at g = 1 with the same classifier (``--pool LABEL=GENERATION_DIR``) is judged tile by tile and read
beside the latent classifier's probability of the requested class on each final latent (``confidence`` in the
generation manifest): how far the sampler took each tile towards its class, against the confidence exact guidance
would give on average (``sum_i p_i^(g+1) / sum_i p_i^g``).

The judge never selects anything; the test tiles are read only to measure.

    python benchmarks/guidance_forecast.py runs/lung_seeds \
        --classifier "1k=runs/lung_seeds/train_latent_classifier/latent_classifier.pt" \
        --pool "1k=runs/lung_seeds/generate" --balance runs/lung_seeds/lc4k/judged_g0.json --output forecast.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["guided_class_shares", "forecast", "expected_confidence", "read_pool"]

CONFIDENCE_BINS = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)


def guided_class_shares(probs: torch.Tensor, classes: torch.Tensor, scale: float,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[K, K]`` matrix: row ``y``, column ``c``: the share of class ``c`` among latents drawn with weights
    ``weights_i * probs[i, y] ** scale`` from the sample ``probs`` (``[N, K]`` classifier probabilities) whose classes
    are ``classes`` (``[N]``); its diagonal is the conditional accuracy exact guidance at ``scale`` would reach."""
    k = probs.shape[1]
    w = probs.double() ** scale * (1.0 if weights is None else weights.double()[:, None])  # [N, K]: column y
    onehot = torch.nn.functional.one_hot(classes.long(), k).double()  # [N, K]: column c
    return (w.T @ onehot) / w.sum(0)[:, None]


def forecast(probs: torch.Tensor, labels: torch.Tensor, judged: torch.Tensor, scales: Sequence[float],
             weights: torch.Tensor | None = None) -> dict[str, dict[str, list[float]]]:
    """Per scale, the diagonal of :func:`guided_class_shares` by the true labels and by the judge's readings (and by
    the judge with ``weights``)."""
    out: dict[str, dict[str, list[float]]] = {}
    for g in scales:
        row = {"true": guided_class_shares(probs, labels, g).diag().tolist(),
               "judged": guided_class_shares(probs, judged, g).diag().tolist()}
        if weights is not None:
            row["judged_model_balance"] = guided_class_shares(probs, judged, g, weights).diag().tolist()
        out[str(g)] = row
    return out


def expected_confidence(probs: torch.Tensor, scale: float) -> list[float]:
    """Per requested class ``y``, the mean ``p(y | z)`` over latents drawn with weights ``p(y | z_i) ** scale``."""
    w = probs.double() ** scale
    return ((w * probs.double()).sum(0) / w.sum(0)).tolist()


def read_pool(run: Path, synthetic_dir: str) -> dict[str, object]:
    """Judge a generation folder tile by tile; the judged accuracy per class and per bin of the latent classifier's
    final confidence in the requested class (the manifest's ``confidence``)."""
    from monai_histodiff.metrics.judge import judge_generated

    report = judge_generated(run / "judge" / "classifier.pt", synthetic_dir, run / "split.json", per_tile=True)
    confidence = {}
    for line in (Path(synthetic_dir) / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        confidence[row["file"]] = float(row["confidence"])
    tiles = report["tiles"]
    conf = torch.tensor([confidence[t["file"]] for t in tiles])
    right = torch.tensor([t["pred"] == t["label"] for t in tiles]).double()
    labels = torch.tensor([t["label"] for t in tiles])
    bins = []
    for lo, hi in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]):
        m = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        bins.append({"confidence": [lo, hi], "tiles": int(m.sum()),
                     "judged_right": float(right[m].mean()) if m.any() else None})
    k = int(labels.max()) + 1
    return {"dir": synthetic_dir, "tiles": len(tiles), "judged": float(right.mean()),
            "judged_per_class": [float(right[labels == c].mean()) for c in range(k)],
            "confidence_per_class": [float(conf[labels == c].mean()) for c in range(k)],
            "confidence_bins": bins, "confusion": report["conditional_accuracy"]["confusion"]}


def _labelled(pairs: Sequence[str], what: str) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not Path(path).exists():
            raise SystemExit(f"--{what} {pair!r}: give LABEL=PATH of an existing file or folder")
        out.append((label, path))
    return out


@torch.no_grad()
def read_test_tiles(run: Path, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The scaled posterior means of the split's test tiles, their labels and the judge's readings of x and of
    ``D'(E(x))`` (rounded to 8 bits as a written tile is)."""
    from monai.data import DataLoader, Dataset

    from monai_histodiff.data import load_datalist, tile_transforms
    from monai_histodiff.data.transforms import round_to_8bit
    from monai_histodiff.engines import diffusion_meta, load_autoencoder
    from monai_histodiff.engines.loading import load_tile_classifier
    from monai_histodiff.handlers.checkpoint import load_checkpoint

    ae_ckpt = run / "pretrain_autoencoder" / "autoencoder.pt"
    scale_factor = diffusion_meta(run / "pretrain_diffusion" / "diffusion.pt", ae_ckpt)["scale_factor"]
    encoder = load_autoencoder(ae_ckpt)
    decoder = load_autoencoder(ae_ckpt, run / "finetune" / "decoder_ft.pt")
    judge_ckpt = run / "judge" / "classifier.pt"
    judge = load_tile_classifier(judge_ckpt)
    image_size = int(load_checkpoint(judge_ckpt, stage="train_downstream")["meta"]["config"]["image_size"])
    items = load_datalist(run / "split.json")["test"]
    z, y, judged_x, judged_rec = [], [], [], []
    for batch in DataLoader(Dataset(items, tile_transforms(image_size)), batch_size=batch_size):
        x = batch["image"]
        mu = encoder.encode(x)[0]
        rec = round_to_8bit(decoder.decode(mu))
        z.append(mu * scale_factor)
        y.append(torch.as_tensor(batch["label"]).long().reshape(-1))
        judged_x.append(judge(x).argmax(1))
        judged_rec.append(judge(rec).argmax(1))
    return {"z": torch.cat(z), "labels": torch.cat(y), "judged_x": torch.cat(judged_x),
            "judged_rec": torch.cat(judged_rec)}


def _balance_weights(g0_report: str, judged_rec: torch.Tensor, k: int) -> tuple[torch.Tensor, list[float]]:
    confusion = torch.tensor(json.loads(Path(g0_report).read_text())["conditional_accuracy"]["confusion"]).double()
    model_share = confusion.sum(0) / confusion.sum()
    data_share = torch.bincount(judged_rec, minlength=k).double() / len(judged_rec)
    return (model_share / data_share)[judged_rec], model_share.tolist()


def _fmt(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an experiment folder (split.json, judge, autoencoder, D', diffusion)")
    parser.add_argument("--classifier", nargs="+", required=True, help="LABEL=latent classifier checkpoint")
    parser.add_argument("--pool", nargs="*", default=[],
                        help="LABEL=generation folder of a g = 1 pool made with that classifier")
    parser.add_argument("--balance", default=None, help="judge report of a g = 0 pool: the model's class balance")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--output", type=Path, default=None, help="JSON to write")
    a = parser.parse_args(argv)

    from monai_histodiff.engines import load_latent_classifier

    tiles = read_test_tiles(a.run)
    labels, judged = tiles["labels"], tiles["judged_rec"]
    k = int(labels.max()) + 1
    weights, model_share = (None, None) if a.balance is None else _balance_weights(a.balance, judged, k)
    report = {"run": str(a.run), "test_tiles": len(labels),
              "judge_accuracy": {"x": float((tiles["judged_x"] == labels).double().mean()),
                                 "D'(E(x))": float((judged == labels).double().mean())},
              "judged_class_share_of_D'(E(x))": (torch.bincount(judged, minlength=k).double() / len(judged)).tolist(),
              "model_class_share_at_g0": model_share, "classifiers": {}}
    pools = dict(_labelled(a.pool, "pool"))
    classifiers = _labelled(a.classifier, "classifier")
    unknown = sorted(set(pools) - {label for label, _ in classifiers})
    if unknown:
        raise SystemExit(f"--pool {unknown[0]!r}: no --classifier has that label")
    judge_x, judge_rec = report["judge_accuracy"].values()
    print(f"test tiles {len(labels)}: judge on x {judge_x:.3f}, on D'(E(x)) {judge_rec:.3f}")
    print("| latent classifier | accuracy at t = 0 | g | exact guidance: true | judged | judged, model's balance | "
          "pool at g = 1 judged |")
    print("|---|---|---|---|---|---|---|")
    for label, path in classifiers:
        clf = load_latent_classifier(path)
        probs = torch.cat([clf(c, torch.zeros(len(c), dtype=torch.long)).softmax(-1)
                           for c in tiles["z"].split(256)]).double()
        entry = {"checkpoint": path, "accuracy_t0": float((probs.argmax(1) == labels).double().mean()),
                 "forecast": forecast(probs, labels, judged, a.scales, weights)}
        if label in pools:
            entry["pool"] = read_pool(a.run, pools[label])
            entry["pool"]["exact_guidance_confidence"] = expected_confidence(probs, 1.0)
        report["classifiers"][label] = entry
        for g, row in entry["forecast"].items():
            mean = {name: sum(v) / len(v) for name, v in row.items()}
            pool = entry.get("pool") if float(g) == 1.0 else None
            print(f"| {label} | {entry['accuracy_t0']:.3f} | {float(g):g} | {mean['true']:.3f} | "
                  f"{mean['judged']:.3f} | {mean.get('judged_model_balance', float('nan')):.3f} | "
                  f"{'' if pool is None else format(pool['judged'], '.3f')} |")
    for label, entry in report["classifiers"].items():
        if "pool" in entry:
            pool = entry["pool"]
            print(f"{label}, pool at g = 1 ({pool['tiles']} tiles): judged per class "
                  f"{_fmt(pool['judged_per_class'])}; the latent classifier's final confidence in the requested class "
                  f"{_fmt(pool['confidence_per_class'])}, exact guidance {_fmt(pool['exact_guidance_confidence'])}; "
                  "judged right by confidence: " + ", ".join(
                      f"[{b['confidence'][0]:g}, {b['confidence'][1]:g}]: {b['tiles']} tiles "
                      f"{'-' if b['judged_right'] is None else format(b['judged_right'], '.2f')}"
                      for b in pool["confidence_bins"]))
    if a.output is not None:
        a.output.write_text(json.dumps(report, indent=1))
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
