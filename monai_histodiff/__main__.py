"""Command line of monai_histodiff: ``python -m monai_histodiff <command> --help``.

Training stages run as MONAI bundles
(``python -m monai.bundle run --config_file "['bundles/common.json','bundles/<stage>.json']"``); these commands prepare
data, download datasets, and run the whole pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _cmd_download(a: argparse.Namespace) -> int:
    from monai_histodiff.data.download import DATASETS, download_dataset

    names = list(DATASETS) if a.dataset == ["all"] else a.dataset
    for name in names:
        print(f"{name}: {DATASETS[name]['description']}")
        download_dataset(name, a.root, url=a.url, md5=a.md5, sha256=a.sha256)
        print(f"  extracted under {a.root}")
    return 0


def _cmd_toy_data(a: argparse.Namespace) -> int:
    from monai_histodiff.data.toy import TOY_NOTICE, make_toy_dataset

    make_toy_dataset(a.output, num_per_class=a.num_per_class, image_size=a.image_size, num_classes=a.num_classes,
                     seed=a.seed, confusion=a.confusion, zoom=a.zoom)
    print(f"wrote {a.num_classes} classes x {a.num_per_class} toy tiles ({a.image_size} px) to {a.output}")
    print(TOY_NOTICE)
    return 0


def _cmd_split(a: argparse.Namespace) -> int:
    from monai_histodiff.data.prepare import prepare_labeled_split

    split = prepare_labeled_split(
        a.dataset_dir, a.output, fraction=a.fraction, per_class=a.per_class, val_fraction=a.val_fraction, seed=a.seed,
        test_dataset=a.test_dir, test_per_class=a.test_per_class, bad_files=a.bad_files, groups_file=a.groups_file,
    )
    print(f"wrote {a.output}: classes {split['classes']}")
    if split["groups_file"]:
        print(f"  groups from {split['groups_file']}: no group is in two of training / validation / test")
    if split["duplicate_sets"]:
        print(f"  {split['duplicate_sets']} sets of byte-identical files kept together (each set one group)")
    for part in ("training", "validation", "test"):
        print(f"  {part:10s} {len(split[part]):6d}  per class {split['counts'][part]}")
    if split["bad_files"]:
        print(f"  skipped {len(split['bad_files'])} unreadable files (listed in bad_files.json)")
    return 0


def _cmd_unlabeled(a: argparse.Namespace) -> int:
    from monai_histodiff.data.prepare import prepare_unlabeled
    from monai_histodiff.data.unlabeled import format_source_counts

    sources = a.sources[0] if len(a.sources) == 1 else a.sources
    weights = a.weights if a.weights in ("equal", "size") else [float(w) for w in a.weights.split(",")]
    data = prepare_unlabeled(sources, a.output, weights=weights, bad_files=a.bad_files)
    print(f"wrote {a.output}")
    print(format_source_counts(data))
    return 0


def _cmd_scan(a: argparse.Namespace) -> int:
    from monai_histodiff.data.datalist import list_images
    from monai_histodiff.data.validation import SCAN_RECORD_NAME, scan_images

    items = [{"image": f} for f in list_images(a.folder, extensions=(".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"))]
    record = a.record
    if record is None and a.report_dir:
        record = os.path.join(a.report_dir, SCAN_RECORD_NAME)
    _, bad = scan_images(items, policy="skip", report_dir=a.report_dir, num_workers=a.workers, record=record,
                         progress=True)
    for b in bad:
        print(f"{b['image']}: {b['reason']}")
    print(f"{len(items) - len(bad)} readable, {len(bad)} bad of {len(items)} image files under {a.folder}")
    return 1 if bad and a.strict else 0


def _parse_settings(pairs: list[str]) -> dict[str, dict[str, object]]:
    """``["train_latent_classifier.lr=1e-3", ...]`` -> ``{"train_latent_classifier": {"lr": 0.001}}``."""
    from monai_histodiff.apps.pipeline import override_value

    out: dict[str, dict[str, object]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not stage or not name:
            raise SystemExit(f"--set takes STAGE.KEY=VALUE (e.g. train_latent_classifier.lr=1e-3), got {pair!r}")
        out.setdefault(stage, {})[name] = override_value(value)
    return out


def _cmd_experiment(a: argparse.Namespace) -> int:
    from monai_histodiff.apps.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(
        output_dir=a.output_dir, dataset_dir=a.dataset_dir, test_dir=a.test_dir,
        unlabeled_dir=a.unlabeled_dir[0] if a.unlabeled_dir and len(a.unlabeled_dir) == 1 else a.unlabeled_dir,
        groups_file=a.groups_file, small=not a.paper_scale, label_fraction=a.fraction, label_per_class=a.per_class,
        val_fraction=a.val_fraction, test_per_class=a.test_per_class, seeds=a.seeds, ratios=a.ratios,
        random_ratio=a.random_ratio or None, ablation=a.ablation, downstream_steps=a.downstream_steps,
        downstream_epochs=a.downstream_epochs, generation_steps=a.generation_steps, guidance_scale=a.guidance_scale,
        pool_factor=a.pool_factor, max_pool_factor=a.max_pool_factor, balance=a.balance,
        min_confidence=a.min_confidence, min_latent_margin=a.min_latent_margin, judge=not a.no_judge,
        sweep_scales=a.sweep_scales, sweep_steps=a.sweep_steps, sweep_per_class=a.sweep_per_class,
        generators=tuple(dict.fromkeys(g for name in a.generator for g in (
            ("histodiffusion", "stylegan2") if name == "both" else (name,)))),
        cfg_scale=a.cfg_scale, sweep_cfg_scales=a.sweep_cfg_scales,
        pretraining=a.pretraining, site_weight=a.site_weight, pseudo_labels=a.pseudo_labels,
        stage_overrides=_parse_settings(a.set),
    )
    run_experiment(cfg)
    out = __import__("pathlib").Path(a.output_dir)
    print((out / (f"ablation_{a.ablation}" if a.ablation else "") / "results.md").read_text())
    return 0


def _cmd_large_files(a: argparse.Namespace) -> int:
    from monai_histodiff.bundle.publish import write_large_files

    path = write_large_files(a.runs, a.url_base, a.output)
    print(f"wrote {path}")
    return 0


def _cmd_download_checkpoints(a: argparse.Namespace) -> int:
    from monai_histodiff.bundle.publish import download_checkpoints

    for path in download_checkpoints(a.bundle_path, a.large_files):
        print(f"{path}: sha256 verified")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from monai_histodiff.apps.demo import run_demo

    return run_demo(a.output_dir, dataset_dir=a.dataset_dir, unlabeled_dir=a.unlabeled_dir, download=a.download,
                    data_root=a.data_root)


def _cmd_export_bundle(a: argparse.Namespace) -> int:
    from monai_histodiff.bundle.export import META_SCHEMA_FILE, export_bundle
    from monai_histodiff.bundle.site_kit import export_site_bundle

    if a.pretrained_runs:
        out = export_site_bundle(a.pretrained_runs, a.output, name=a.name, version=a.version, small=a.small,
                                 url_base=a.url_base, overwrite=a.overwrite)
        print(f"wrote the adaptation kit {out} (commands in {out}/docs/README.md)")
        first = f"python -m monai.bundle run --config_file {out}/configs/train_aux_classifier.json --bundle_root {out}"
    else:
        out = export_bundle(a.checkpoint, a.output, name=a.name, version=a.version, overwrite=a.overwrite)
        print(f"wrote the MONAI bundle {out}")
        first = f"python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out}"
    print(f"  verify: python -m monai.bundle verify_metadata --meta_file {out}/configs/metadata.json "
          f"--filepath {META_SCHEMA_FILE}")
    print(f"  run:    {first} --dataset_dir <tiles>")
    return 0


def _cmd_convert_checkpoint(a: argparse.Namespace) -> int:
    from monai_histodiff.handlers.checkpoint import UnsafeCheckpointError, convert_checkpoint

    try:  # with the flag, a file that needs full unpickling is loaded after a warning (convert_checkpoint)
        out = convert_checkpoint(a.input, a.output, trust_source=a.trust_source_and_run_its_code)
    except UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: tensors and plain values only, loads with torch.load(..., weights_only=True)")
    return 0


def _cmd_judge(a: argparse.Namespace) -> int:
    from monai_histodiff.metrics.classification import write_report_json
    from monai_histodiff.metrics.judge import judge_generated

    report = judge_generated(a.judge_ckpt, a.synthetic_dir, a.split, decisions_csv=a.decisions,
                             image_size=a.image_size, fd_num_samples=a.fd_num_samples, batch_size=a.batch_size,
                             device=a.device, seed=a.seed)
    write_report_json(report, a.output)
    acc = report["conditional_accuracy"]
    print(f"wrote {a.output}")
    print(f"  conditional accuracy (judge agrees with the requested class): {acc['accuracy']:.4f} of {acc['count']}")
    for part in ("kept", "rejected"):
        if part in report and report[part]["count"]:
            print(f"  {part:8s} {report[part]['accuracy']:.4f} of {report[part]['count']}")
    fd = report["frechet"]
    if fd.get("overall") is not None:
        print(f"  {fd['metric_name']} vs {fd['real']}: {fd['overall']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per task."""
    p = argparse.ArgumentParser(prog="python -m monai_histodiff", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="<command>")

    from monai_histodiff.data.download import DATASETS

    d = sub.add_parser("download", help="download NCT-CRC-HE-100K / CRC-VAL-HE-7K (Zenodo record 1214456) or the "
                                        "Kather 2016 texture set (record 53169)")
    d.add_argument("dataset", nargs="+", choices=[*DATASETS, "all"])
    d.add_argument("--root", required=True, help="destination folder")
    d.add_argument("--url", default=None, help="mirror or file:// archive instead of Zenodo")
    d.add_argument("--md5", default=None, help="expected md5 (overrides the built-in one of an md5-pinned dataset)")
    d.add_argument("--sha256", default=None, help="expected sha256 (overrides the built-in one of kather2016)")
    d.set_defaults(func=_cmd_download)

    t = sub.add_parser("toy-data", help="write the seeded synthetic toy tiles used by the demo")
    t.add_argument("--output", required=True)
    t.add_argument("--num_per_class", type=int, default=60)
    t.add_argument("--image_size", type=int, default=64)
    t.add_argument("--num_classes", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--confusion", type=float, default=0.0,
                   help="share of tiles drawn on another class's background (make demo: 0.2)")
    t.add_argument("--zoom", type=int, default=1, help="draw structures this many times larger (make demo: 2)")
    t.set_defaults(func=_cmd_toy_data)

    s = sub.add_parser("split", help="scan a labeled dataset and write the stratified low-label split datalist")
    s.add_argument("--dataset_dir", required=True, help="class-folder tree, CSV (image,label) or JSON datalist")
    s.add_argument("--output", required=True, help="split JSON to write (classes.json is written beside it)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float, help="share of each class for the labeled subset (paper: 0.05)")
    g.add_argument("--per_class", type=int, help="number of labeled tiles per class")
    s.add_argument("--val_fraction", type=float, default=0.2, help="share of the subset held out for validation")
    s.add_argument("--test_dir", default=None, help="separate test set (e.g. CRC-VAL-HE-7K); default: the rest")
    s.add_argument("--test_per_class", type=int, default=None, help="cap the test set per class")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--bad_files", choices=["skip", "error"], default="skip")
    s.add_argument("--groups_file", default=None,
                   help="CSV image,group or image,label,group (patient / slide / original image id; paths relative to "
                        "it or to dataset_dir): a group never straddles the split. Default: <dataset_dir>/groups.csv "
                        "when present")
    s.set_defaults(func=_cmd_split)

    u = sub.add_parser("unlabeled", help="list M unlabeled source folders for pre-training")
    u.add_argument("--sources", nargs="+", required=True, help="source folders, or one parent of source folders")
    u.add_argument("--weights", default="equal", help="'equal', 'size', or comma-separated weights per source")
    u.add_argument("--output", required=True)
    u.add_argument("--bad_files", choices=["skip", "error"], default="skip")
    u.set_defaults(func=_cmd_unlabeled)

    c = sub.add_parser("scan", help="report unreadable, truncated, zero-byte or non-image files in a folder")
    c.add_argument("folder")
    c.add_argument("--report_dir", default=None, help="write bad_files.json here")
    c.add_argument("--strict", action="store_true", help="exit 1 when a bad file is found")
    c.add_argument("--workers", type=int, default=min(32, (os.cpu_count() or 1) + 4), help="decoding threads")
    c.add_argument("--record", default=None,
                   help="scan record (SQLite; default: scan_record.sqlite in --report_dir, none without it): files "
                        "with a verdict there and the same size and modification time are not decoded again")
    c.set_defaults(func=_cmd_scan)

    e = sub.add_parser("experiment", help="the paper's Table 1 protocol: baseline, + random, + selective ratios")
    e.add_argument("--output_dir", required=True, help="run folder (pre-trained checkpoints are reused from it)")
    e.add_argument("--dataset_dir", required=True, help="labeled class-folder tree")
    e.add_argument("--test_dir", default=None, help="separate test set; default: tiles the labeled subset did not take")
    e.add_argument("--unlabeled_dir", nargs="+", default=None,
                   help="pre-train here first when no checkpoints exist: a parent of source folders, or the folders")
    e.add_argument("--pretraining", choices=["sources", "site", "site+sources"], default="sources",
                   help="pre-training data when no checkpoints exist: the --unlabeled_dir sources (the paper's "
                        "setting), the site's own tiles outside the test groups (labels dropped), or both")
    e.add_argument("--site_weight", type=float, default=0.5,
                   help="with --pretraining site+sources: the share of draws that go to the site's tiles")
    e.add_argument("--paper_scale", action="store_true", help="256 px configs (GPU); default: bundles/small.json")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--fraction", type=float, default=None, help="labeled share per class (paper: 0.05)")
    g.add_argument("--per_class", type=int, default=None, help="labeled tiles per class")
    e.add_argument("--val_fraction", type=float, default=0.2)
    e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    e.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0, 3.0])
    e.add_argument("--random_ratio", type=float, default=0.5, help="ratio of the '+ random' row (0: no such row)")
    e.add_argument("--ablation", choices=["no_finetune", "no_pretrain"], default=None)
    e.add_argument("--test_per_class", type=int, default=None, help="cap the test set per class (the rest: judge pool)")
    e.add_argument("--groups_file", default=None, help="image,group CSV (default: <dataset_dir>/groups.csv if present)")
    e.add_argument("--downstream_steps", type=int, default=None,
                   help="optimizer steps of every row's downstream classifier (default: downstream_epochs over the "
                        "baseline's training set)")
    e.add_argument("--downstream_epochs", type=int, default=None, help="default: the bundle's max_epochs")
    e.add_argument("--generation_steps", type=int, default=None, help="DDIM steps (default: the bundle's)")
    e.add_argument("--guidance_scale", type=float, default=None, help="g (default: the bundle's, 1.0)")
    e.add_argument("--pool_factor", type=float, default=1.5, help="first pool: this x the largest quota per class")
    e.add_argument("--max_pool_factor", type=float, default=6.0, help="top-up bound, x the quota per class")
    e.add_argument("--balance", choices=["proportional", "none"], default="proportional",
                   help="selection when a class falls short: keep the class balance, or keep what passes")
    e.add_argument("--min_confidence", type=float, default=None, help="selection's confidence rule (default: off)")
    e.add_argument("--min_latent_margin", type=float, default=0.1,
                   help="stop unless the latent classifier beats chance by this at the lowest noise bucket")
    e.add_argument("--no_judge", action="store_true", help="skip the independent judge")
    e.add_argument("--sweep_scales", type=float, nargs="*", default=[], help="guidance scales the judge measures")
    e.add_argument("--sweep_steps", type=int, nargs="*", default=[], help="DDIM step counts the judge measures")
    e.add_argument("--sweep_per_class", type=int, default=16, help="tiles per class per sweep setting")
    e.add_argument("--generator", nargs="+", choices=["histodiffusion", "stylegan2", "conditional", "both"],
                   default=["histodiffusion"],
                   help="whose synthetic tiles the rows add, one or more: HistoDiffusion's (classifier guidance, the "
                        "paper's), the class-conditional StyleGAN2 baseline's (bundles/train_stylegan2.json, trained "
                        "on the same split), 'conditional' (the pre-trained diffusion model fine-tuned with the class "
                        "as a condition, bundles/finetune_conditional.json, sampled with classifier-free guidance); "
                        "'both': histodiffusion and stylegan2")
    e.add_argument("--cfg_scale", type=float, default=None,
                   help="classifier-free guidance w of the 'conditional' generator (default: the generate bundle's)")
    e.add_argument("--sweep_cfg_scales", type=float, nargs="*", default=[],
                   help="classifier-free guidance scales the judge measures (the 'conditional' generator)")
    e.add_argument("--pseudo_labels", action="store_true",
                   help="train the latent classifier also on the site's pre-training tiles the auxiliary classifier "
                        "labels confidently (not the paper's method; needs --pretraining site or site+sources)")
    e.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="per-stage bundle override, repeatable (e.g. --set train_latent_classifier.lr=1e-3)")
    e.set_defaults(func=_cmd_experiment)

    lf = sub.add_parser("large-files", help="write large_files.yml (sha256, URLs) for the pre-trained checkpoints")
    lf.add_argument("--runs", default="runs", help="pre-training run folder")
    lf.add_argument("--url_base", required=True, help="where the checkpoints are published")
    lf.add_argument("--output", default="large_files.yml")
    lf.set_defaults(func=_cmd_large_files)
    dc = sub.add_parser("download-checkpoints", help="fetch the checkpoints large_files.yml lists; keep each only if "
                        "its sha256 matches (a mismatch names the file, the expected and the actual hash)")
    dc.add_argument("--bundle_path", default=".", help="folder the listed paths are relative to")
    dc.add_argument("--large_files", default="large_files.yml", help="the list, relative to --bundle_path")
    dc.set_defaults(func=_cmd_download_checkpoints)

    m = sub.add_parser("demo", help="run the pipeline on the default (toy) data, $HISTODIFF_DATA or a public H&E set "
                                    "fetched on request")
    m.add_argument("--output_dir", default="demo_output")
    m.add_argument("--dataset_dir", default=None, help="labeled class-folder tree (default: $HISTODIFF_DATA or toy)")
    m.add_argument("--unlabeled_dir", default=None,
                   help="pre-training sources (default: $HISTODIFF_UNLABELED; real data: the site's tiles outside the "
                        "test groups)")
    m.add_argument("--download", default=None, choices=sorted(DATASETS),
                   help="fetch this public dataset into --data_root (checksum checked, once) and run on it, e.g. "
                        "kather2016 (258 MB)")
    m.add_argument("--data_root", default="data", help="where --download puts the dataset")
    m.set_defaults(func=_cmd_demo)

    e = sub.add_parser("export-bundle", help="export a downstream classifier checkpoint, or the pre-trained models "
                                             "with the configs a new site runs (the adaptation kit), as a MONAI bundle")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="checkpoint of the train_downstream stage: the classifier bundle")
    what.add_argument("--pretrained_runs", help="run folder of pretrain_autoencoder and pretrain_diffusion: the "
                                                "adaptation kit (configs of every site stage, models/, docs)")
    e.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                   help="kit: merge the CPU size's settings (default: when the autoencoder was pre-trained at the "
                        "CPU size's tile size)")
    e.add_argument("--url_base", default=None, help="kit: write large_files.yml with these URLs instead of copying "
                                                    "the checkpoints into models/")
    e.add_argument("--output", required=True, help="bundle folder to write")
    e.add_argument("--name", default=None, help="bundle name (default: the folder name)")
    e.add_argument("--version", default="0.1.0", help="bundle version")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    e.set_defaults(func=_cmd_export_bundle)

    cc = sub.add_parser("convert-checkpoint", help="rewrite a checkpoint/cache as tensors and plain values only, so it "
                                                   "loads with weights_only=True")
    cc.add_argument("input", help="the file to convert (never modified)")
    cc.add_argument("output", help="the converted file to write")
    cc.add_argument("--trust-source-and-run-its-code", action="store_true",
                    help="allow full unpickling (weights_only=False) of a file that needs it: this runs any code the "
                         "file holds; only for a file from a source you trust")
    cc.set_defaults(func=_cmd_convert_checkpoint)

    j = sub.add_parser("judge", help="measure generated tiles with an independent classifier (the judge)")
    j.add_argument("--judge_ckpt", required=True, help="train_downstream checkpoint trained on the judge datalist")
    j.add_argument("--split", required=True, help="the split datalist the judge's data came from")
    j.add_argument("--synthetic_dir", required=True, help="generation folder (or its manifest.jsonl)")
    j.add_argument("--decisions", default=None, help="selection decisions.csv: adds kept / rejected measures")
    j.add_argument("--output", required=True, help="JSON report to write")
    j.add_argument("--image_size", type=int, default=None, help="default: the judge's training size")
    j.add_argument("--fd_num_samples", type=int, default=1000, help="tiles per set for the Frechet distance")
    j.add_argument("--batch_size", type=int, default=64)
    j.add_argument("--device", default="cpu")
    j.add_argument("--seed", type=int, default=0)
    j.set_defaults(func=_cmd_judge)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m monai_histodiff``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # a stage or the runner stopped: its own message is the last line (errors.py)
        from monai_histodiff.errors import DEBUG_ENV, PREFIX, summary_line
        from monai_histodiff.apps.experiment import ExperimentError
        from monai_histodiff.apps.pipeline import StageError

        if os.environ.get(DEBUG_ENV) or not isinstance(e, (StageError, ExperimentError, FileNotFoundError,
                                                             ValueError)):
            raise
        message = str(e)
        last = message.splitlines()[-1]
        print(message if last.startswith(PREFIX) else message + "\n" + summary_line(e, args.command, "command"),
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
