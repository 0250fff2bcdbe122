"""The Table 1 runner on a tiny configuration (1 seed, 2 rows) and the test-set firewall of downstream training."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from monai_histodiff.data import load_datalist, write_datalist
from monai_histodiff.apps.experiment import (
    ExperimentConfig,
    ExperimentError,
    _prepare_ablation,
    _slug,
    _Stages,
    experiment_rows,
    paired_differences,
    pool_counts,
    run_experiment,
    summarise,
    write_results,
)
from tests.bundles.conftest import SMALL, run_bundle


def test_rows_follow_table_1():
    names = [r.name for r in experiment_rows([0.5, 1.0, 2.0, 3.0], 0.5)]
    assert names == ["Baseline (real only)", "+ random 50%", "+ selective 50%", "+ selective 100%",
                     "+ selective 200%", "+ selective 300%"]


def test_summary_mean_and_std():
    rows = [{"row": "a", "mode": "baseline", "ratio": 0.0, "fd": None, "accuracy": a, "macro_f1": 1.0,
             "macro_sensitivity": 1.0, "macro_specificity": 1.0} for a in (0.5, 0.7)]
    s = summarise(rows)[0]
    assert s["accuracy"][0] == 0.6 and abs(s["accuracy"][1] - 0.1414) < 1e-3 and s["fd"] is None


def test_pool_counts_top_up_short_classes_within_the_bound():
    # class 0 already has enough selectable tiles; class 1 accepted 5 of 20 (25%), needs 5 more -> 20 + 1.2*5/0.25
    assert pool_counts([10, 10], [20, 20], [12, 5], max_pool_factor=6.0) == [20, 44]
    assert pool_counts([10, 10], [20, 60], [12, 0], max_pool_factor=6.0) == [20, 60]  # capped at 6 x quota
    assert pool_counts([10, 10], [20, 20], [10, 10], max_pool_factor=6.0) == [20, 20]  # nothing to do: stop


def test_paired_differences_per_seed():
    rows = [{"row": "b", "mode": "baseline", "seed": s, "accuracy": a} for s, a in ((0, 0.5), (1, 0.7))]
    rows += [{"row": "x", "mode": "selective", "seed": s, "accuracy": a} for s, a in ((0, 0.6), (1, 0.7))]
    d = paired_differences(rows)["x"]
    assert d["per_seed"] == {0: pytest.approx(0.1), 1: pytest.approx(0.0)} and d["mean"] == pytest.approx(0.05)


def test_short_rows_are_marked_in_the_table(tmp_path):
    rows = [{"row": "Baseline (real only)", "mode": "baseline", "ratio": 0.0, "seed": 0, "fd": None, "kept": 0,
             "quota": 0, "status": "full", "steps": 6, "accuracy": 0.5, "macro_f1": 0.5, "macro_sensitivity": 0.5,
             "macro_specificity": 0.5},
            {"row": "+ selective 300%", "mode": "selective", "ratio": 3.0, "seed": 0, "fd": 1.0, "kept": 12,
             "quota": 30, "status": "short", "steps": 6, "accuracy": 0.4, "macro_f1": 0.4, "macro_sensitivity": 0.4,
             "macro_specificity": 0.4}]
    write_results(rows, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| + selective 300% | 12 / 30 **short** |" in md and "-0.100 +- 0.000" in md and "same 6 optimizer" in md


def test_a_split_with_a_group_on_two_sides_stops_the_run(tmp_path):
    split = {"classes": ["a", "b"], "training": [{"image": "x.png", "label": 0, "group": "g1"}],
             "validation": [], "test": [{"image": "y.png", "label": 0, "group": "g1"}]}
    write_datalist(split, tmp_path / "split.json")
    with pytest.raises(ValueError, match="g1"):
        run_experiment(ExperimentConfig(output_dir=str(tmp_path), seeds=(0,)))


@pytest.mark.parametrize("settings, named", [
    ({"stage_overrides": {"generate": {"guidance_scale": -2}}}, "generate: 1 setting"),
    ({"extra": {"batch_size": 0}}, "every stage: 1 setting"),
    ({"ratios": (0.5, 0.0)}, "--ratio=0.0"),
    ({"seeds": (0, -1)}, "--seed=-1"),
    ({"sweep_steps": (50, 0)}, "--num_inference_steps=0"),
    ({"downstream_steps": 0, "label_fraction": 1.5}, "experiment: 2 settings"),
])
def test_bad_settings_stop_the_runner_before_any_stage(tmp_path, settings, named):
    """``--set STAGE.KEY=VALUE`` and the runner's own numbers meet the stages' rules when the run is configured, not
    after an hour of pre-training."""
    with pytest.raises(ValueError, match=re.escape(named)):
        ExperimentConfig(output_dir=str(tmp_path / "run"), **settings)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ablation", ["no_finetune", "no_pretrain"])
def test_ablation_folder_reads_the_main_split(tmp_path, ablation):
    """An ablation runs one folder deeper on the main run's split: its copy of split.json must name the same tiles
    (paths in a datalist are relative to its file; a byte copy would point one level off)."""
    tiles = tmp_path / "data"
    tiles.mkdir()
    for name in ("a.png", "b.png"):
        (tiles / name).write_bytes(b"tile")
    main = tmp_path / "run"
    write_datalist({"classes": ["x", "y"], "training": [{"image": str(tiles / "a.png"), "label": 0}],
                    "validation": [], "test": [{"image": str(tiles / "b.png"), "label": 1}]}, main / "split.json")
    out = _prepare_ablation(ExperimentConfig(output_dir=str(main), ablation=ablation), main)
    assert out == main / f"ablation_{ablation}"
    copy = load_datalist(out / "split.json")
    assert [it["image"] for it in copy["training"] + copy["test"]] == [str(tiles / "a.png"), str(tiles / "b.png")]


def test_the_judge_is_fire_walled_from_every_stage_but_evaluate(tmp_path):
    stages = _Stages(ExperimentConfig(output_dir=str(tmp_path)), tmp_path)
    stages.firewall.add("/runs/judge/classifier.pt")
    with pytest.raises(ExperimentError, match="never selects or trains"):
        stages("select", feature_extractor_ckpt="/runs/judge/classifier.pt")


def test_protocol_on_a_tiny_run(toy_labeled_site, tmp_path):
    """The CI version of the Table 1 protocol: one seed, baseline + one selective row, a few hundred tiles."""
    run_dir = tmp_path / "exp"
    shutil.copytree(toy_labeled_site, run_dir, ignore=shutil.ignore_patterns("generate", "select*", "rows"))
    # the protocol is checked here; whether the latent classifier learns is tests/bundles/test_latent_classifier_real
    cfg = ExperimentConfig(output_dir=str(run_dir), dataset_dir=str(run_dir / "labeled"), seeds=(0,), ratios=(0.5,),
                           random_ratio=None, downstream_steps=6, downstream_epochs=2, generation_steps=5,
                           judge_epochs=1, judge_steps=4, min_latent_margin=-1.0, max_pool_factor=3.0)
    results = run_experiment(cfg)
    assert [r["row"] for r in results] == ["Baseline (real only)", "+ selective 50%"]
    report = json.loads((run_dir / "experiment_report.json").read_text())
    # quotas: every round of the pool is recorded; a row short of its quota is marked, never silently smaller
    sel = report["selections"]["+ selective 50%"]
    assert results[1]["kept"] == sel["kept_total"] and results[1]["quota"] == sel["quota_total"] > 0
    assert (sel["status"] == "full") == (sel["kept_total"] == sel["quota_total"])
    md = (run_dir / "results.md").read_text()
    assert f"{sel['kept_total']} / {sel['quota_total']}" in md and ("**short**" in md) == (sel["status"] == "short")
    assert report["pool"]["rounds"] and all(r["counts"] for r in report["pool"]["rounds"])
    # equal step budget from the same initial weights
    assert {r["steps"] for r in results} == {6} and len({r["init_digest"] for r in results}) == 1
    # the judge: trained outside the test groups, evaluated on test, never given to a stage that selects or trains
    assert report["judge_test_accuracy"] is not None and report["judge"]["pool"]["conditional_accuracy"]["count"]
    judge_ckpt = str(run_dir / "judge" / "classifier.pt")
    commands = [json.loads(line) for line in (run_dir / "commands.jsonl").read_text().splitlines()]
    assert all(judge_ckpt not in json.dumps(c["overrides"]) for c in commands if c["stage"] != "evaluate")
    assert any(judge_ckpt in json.dumps(c["overrides"]) for c in commands if c["stage"] == "evaluate")
    metrics = json.loads((run_dir / "rows" / "selective_50" / "seed0" / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["evaluated_on"]["part"] == "test"
    assert metrics["frechet"]["metric_name"] == "FD (judge)" and not metrics["frechet"]["is_fid"]
    assert (run_dir / "accuracy_vs_ratio.png").stat().st_size > 0
    # the ceiling (judge on x, D(E(x)), D'(E(x)) of test tiles), the guidance check and the pre-training record
    ceiling = report["ceiling"]
    assert set(ceiling["accuracy"]) == {"x", "D(E(x))", "D'(E(x))"} and ceiling["part"] == "test"
    assert ceiling["tiles"] == sum(min(100, n) for n in load_datalist(run_dir / "split.json")["counts"]["test"])
    assert (run_dir / "ceiling.png").is_file() and "Ceiling (the judge on" in md
    assert report["guidance_check"]["measure"] == "aux_agreement" and "Guidance check" in md
    assert report["pretraining"]["setting"] == "unknown"  # checkpoints copied into the folder without a listing


def test_downstream_training_never_reads_the_test_set(toy_labeled_site, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(toy_labeled_site, site, ignore=shutil.ignore_patterns("generate", "select*", "rows"))
    split = load_datalist(site / "split.json")
    test_files = [it["image"] for it in split["test"]]
    assert test_files and not set(test_files) & {it["image"] for it in split["training"] + split["validation"]}
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for i, f in enumerate(test_files):  # training must succeed without the test tiles on disk
        shutil.move(f, hidden / f"{i}.png")
    run_bundle(["bundles/train_downstream.json", *SMALL], output_dir=str(site), max_epochs=1, batch_size=8)
    for i, f in enumerate(test_files):
        shutil.move(hidden / f"{i}.png", f)
    run_bundle(["bundles/evaluate.json", *SMALL], output_dir=str(site))
    metrics = json.loads((site / "evaluate" / "metrics.json").read_text())
    assert metrics["evaluated_on"]["count"] == len(test_files) and (site / "evaluate" / "confusion_matrix.png").is_file()


def test_side_by_side_picture_has_a_real_and_a_generated_row_per_class(toy_dir, tmp_path):
    from PIL import Image

    from monai_histodiff.data import scan_class_folders
    from monai_histodiff.apps.experiment import write_side_by_side

    items, classes = scan_class_folders(toy_dir)
    write_datalist({"classes": classes, "training": items, "validation": [], "test": []}, tmp_path / "split.json")
    gen = tmp_path / "generate"
    gen.mkdir()
    with open(gen / "manifest.jsonl", "w") as f:
        for it in items[::2]:
            f.write(json.dumps({"file": it["image"], "class_index": it["label"]}) + "\n")
    path = write_side_by_side(tmp_path / "split.json", gen, tmp_path / "real_vs_synthetic.png", 32, per_row=4)
    h, w = Image.open(path).size[1], Image.open(path).size[0]
    assert h == 2 * len(classes) * (32 + 2) + 2 and w == 4 * (32 + 2) + 2


def test_rows_of_two_generators_share_one_baseline():
    rows = experiment_rows([0.5, 2.0], 0.5, ("histodiffusion", "stylegan2"))
    assert [r.name for r in rows] == [
        "Baseline (real only)", "HistoDiffusion + random 50%", "HistoDiffusion + selective 50%",
        "HistoDiffusion + selective 200%", "StyleGAN2 + random 50%", "StyleGAN2 + selective 50%",
        "StyleGAN2 + selective 200%"]
    # HistoDiffusion's rows keep their folders, so adding the GAN to a finished run reuses them
    assert [_slug(r) for r in rows] == ["baseline", "random_50", "selective_50", "selective_200",
                                        "stylegan2_random_50", "stylegan2_selective_50", "stylegan2_selective_200"]
    with pytest.raises(ValueError, match="generators must name"):
        ExperimentConfig(output_dir="unused", generators=("vae",))
    with pytest.raises(ValueError, match="include 'histodiffusion'"):
        ExperimentConfig(output_dir="unused", generators=("stylegan2",), ablation="no_finetune")


def test_stylegan2_rows_and_a_rerun_that_reuses_every_row(toy_labeled_site, tmp_path):
    """The GAN baseline's rows under the same protocol (its own pool, the same selection, budget and judge), and a
    second run of the runner that trains and selects nothing again (the way a generator is added to a finished run)."""
    run_dir = tmp_path / "exp"
    shutil.copytree(toy_labeled_site, run_dir, ignore=shutil.ignore_patterns("generate*", "select*", "rows"))
    tiny_gan = {"max_epochs": 2, "batch_size": 8, "channel_base": 128, "channel_max": 32, "z_dim": 16, "w_dim": 16,
                "mapping_layers": 1, "sample_interval": 2, "num_workers": 0}
    cfg = ExperimentConfig(output_dir=str(run_dir), dataset_dir=str(run_dir / "labeled"), seeds=(0,), ratios=(0.5,),
                           random_ratio=None, downstream_steps=4, downstream_epochs=1, judge_epochs=1, judge_steps=4,
                           pool_factor=1.0, max_pool_factor=1.0, generators=("stylegan2",),
                           stage_overrides={"train_stylegan2": tiny_gan})
    results = run_experiment(cfg)
    assert [r["row"] for r in results] == ["Baseline (real only)", "StyleGAN2 + selective 50%"]
    assert [r["generator"] for r in results] == [None, "stylegan2"]
    report = json.loads((run_dir / "experiment_report.json").read_text())
    assert report["pool_stylegan2"]["rounds"] and report["pool"] == {} and report["latent_classifier"] is None
    assert report["judge"]["pool_stylegan2"]["conditional_accuracy"]["count"] > 0
    sel = report["selections"]["StyleGAN2 + selective 50%"]
    assert results[1]["kept"] == sel["kept_total"] and results[1]["quota"] == sel["quota_total"] > 0
    report_file = run_dir / "rows" / "stylegan2_selective_50" / "select" / "selection_report.json"
    selection = json.loads(report_file.read_text())
    assert selection["settings"]["synthetic_manifest"] == (run_dir / "generate_stylegan2" / "manifest.jsonl").as_posix()
    assert {r["steps"] for r in results} == {4} and len({r["init_digest"] for r in results}) == 1
    assert (run_dir / "real_vs_synthetic_stylegan2.png").is_file()

    first = len((run_dir / "commands.jsonl").read_text().splitlines())
    again = run_experiment(cfg)
    assert [(r["row"], r["accuracy"]) for r in again] == [(r["row"], r["accuracy"]) for r in results]
    rerun = [json.loads(line)["stage"] for line in (run_dir / "commands.jsonl").read_text().splitlines()[first:]]
    assert set(rerun) <= {"generate_stylegan2", "select"} and "train_downstream" not in rerun, rerun
    assert all(json.loads(line)["log"].startswith(("generate_stylegan2_round", "stylegan2_pool_check"))
               for line in (run_dir / "commands.jsonl").read_text().splitlines()[first:])


def test_conditional_fine_tune_rows_with_classifier_free_guidance(toy_labeled_site, toy_unlabeled, tmp_path):
    """The second route (issue 21): the pre-trained model fine-tuned with the class as a condition, its own pool,
    rows, guidance check, sweep over w and wall time, under the same protocol and judge."""
    run_dir = tmp_path / "exp"
    shutil.copytree(toy_labeled_site, run_dir, ignore=shutil.ignore_patterns("generate*", "select*", "rows"))
    tiny = {"max_epochs": 1, "epoch_length": 3, "batch_size": 4, "warmup_steps": 1, "grid_inference_steps": 2,
            "num_grid_per_class": 1, "num_workers": 0}
    cfg = ExperimentConfig(output_dir=str(run_dir), dataset_dir=str(run_dir / "labeled"),
                           unlabeled_dir=str(toy_unlabeled), seeds=(0,), ratios=(0.5,), random_ratio=None,
                           downstream_steps=4, downstream_epochs=1, generation_steps=3, judge_epochs=1, judge_steps=4,
                           min_latent_margin=-1.0, pool_factor=1.0, max_pool_factor=1.0, generators=("conditional",),
                           cfg_scale=3.0, sweep_cfg_scales=(0.0, 3.0), sweep_steps=(2,), sweep_per_class=1,
                           stage_overrides={"finetune_conditional": tiny})
    results = run_experiment(cfg)
    assert [r["row"] for r in results] == ["Baseline (real only)", "Conditional fine-tune (CFG) + selective 50%"]
    report = json.loads((run_dir / "experiment_report.json").read_text())
    assert report["pool_conditional"]["rounds"] and report["pool"] == {}
    assert report["judge"]["pool_conditional"]["conditional_accuracy"]["count"] > 0
    assert [(s["cfg_scale"], s["steps"]) for s in report["judge"]["sweep_conditional"]] == [(0.0, 2), (3.0, 2)]
    assert report["stage_seconds"]["finetune_conditional"] > 0  # its own wall time, reported
    assert "generate_conditional_round0" in report["stage_seconds"]  # its pool's rounds logged under their own name
    check = report["guidance_check_conditional"]
    assert check["cfg_scale"] == 3.0 and check["guidance_scale"] == 0.0
    assert "Classifier-free guidance check" in (run_dir / "results.md").read_text()
    rows = [json.loads(line) for line in (run_dir / "generate_conditional" / "manifest.jsonl").read_text().splitlines()]
    assert {r["cfg_scale"] for r in rows} == {3.0} and {r["guidance_scale"] for r in rows} == {0.0}
    assert (run_dir / "real_vs_synthetic_conditional.png").is_file()
    # the unlabeled tiles (the run's unlabeled_dir, as pre-training would read it) carry the null class
    meta = torch.load(run_dir / "finetune_conditional" / "diffusion_conditional.pt", weights_only=True)["meta"]
    assert meta["config"]["unlabeled_tiles"] == 80


def test_pool_record_counts_the_tiles_a_rerun_finds(tmp_path):
    """A rerun's first round finds every tile of the earlier rounds: the record (and the top-up's acceptance rate)
    uses what the pool holds, not what that round asked for."""
    from monai_histodiff.apps.experiment import _pool_sizes

    rows = [{"file": f"A/A_{i:06d}.png", "class": "A", "index": i} for i in range(5)]
    rows += [{"file": f"B/B_{i:06d}.png", "class": "B", "index": i} for i in range(2)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _pool_sizes(tmp_path, ["A", "B"], [3, 3]) == [5, 3]
    assert _pool_sizes(tmp_path / "absent", ["A", "B"], [3, 3]) == [3, 3]


def test_paired_interval_of_the_mean_difference():
    """Student's t, hand-computed: differences 0.01, 0.03, 0.02 -> mean 0.02, std 0.01, t(0.975, 2) = 4.3027."""
    from monai_histodiff.apps.experiment import paired_interval

    lo, hi = paired_interval([0.01, 0.03, 0.02])
    half = 4.302653 * 0.01 / 3 ** 0.5
    assert lo == pytest.approx(0.02 - half, abs=1e-6) and hi == pytest.approx(0.02 + half, abs=1e-6)
    assert paired_interval([0.02]) is None
    rows = [{"row": "b", "mode": "baseline", "seed": s, "accuracy": 0.5} for s in range(3)]
    rows += [{"row": "x", "mode": "selective", "seed": s, "accuracy": 0.5 + d} for s, d in enumerate((.01, .03, .02))]
    assert paired_differences(rows)["x"]["ci95"] == pytest.approx((lo, hi))


def test_a_test_tile_in_pretraining_stops_the_run_before_any_stage(tmp_path):
    """A pre-training listing that holds a tile of a test group (here: written by hand into the run folder, as a
    reused or edited listing would be) stops the runner, naming the group, before anything is trained."""
    from PIL import Image

    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tiles / name)
    run = tmp_path / "run"
    write_datalist({"classes": ["x", "y"], "training": [{"image": str(tiles / "a.png"), "label": 0, "group": "ga"}],
                    "validation": [], "pool": [],
                    "test": [{"image": str(tiles / "b.png"), "label": 1, "group": "gt"}]}, run / "split.json")
    write_datalist({"setting": "site", "unlabeled": [{"image": str(tiles / "a.png"), "sample_weight": 1.0},
                                                      {"image": str(tiles / "c.png"), "group": "gt",
                                                       "sample_weight": 1.0}]}, run / "pretraining.json")
    with pytest.raises(ExperimentError, match="group 'gt' of the test set"):
        run_experiment(ExperimentConfig(output_dir=str(run), pretraining="site", seeds=(0,)))
    assert not (run / "pretrain_autoencoder").exists() and not (run / "logs").exists()
    with pytest.raises(ValueError, match="pretraining must be one of"):
        ExperimentConfig(output_dir=str(run), pretraining="everything")


def test_pseudo_labels_read_only_the_sites_own_pretraining_tiles(tmp_path):
    """``pseudo_labels`` passes the latent classifier the site tiles of the run's pre-training listing (never a public
    source's), and is refused where the run has no site tiles."""
    from monai.bundle import ConfigParser

    from monai_histodiff.apps.experiment import _pseudo_label_overrides

    write_datalist({"setting": "site+sources", "unlabeled": [
        {"image": str(tmp_path / "site_a.png"), "source": "site", "group": "g1"},
        {"image": str(tmp_path / "brca.png"), "source": "tcga_brca"},
        {"image": str(tmp_path / "site_b.png"), "source": "site", "group": "g2"}]}, tmp_path / "pretraining.json")
    listing = (tmp_path / "pretraining.json").as_posix()
    overrides = _pseudo_label_overrides({"setting": "site+sources", "listing": listing})
    assert overrides["pseudo_labels"] is True
    parser = ConfigParser({"imports": ["$import monai_histodiff"], "items": overrides["pseudo_label_datalist"]})
    assert [it["image"] for it in parser.get_parsed_content("items")] == [str(tmp_path / "site_a.png"),
                                                                           str(tmp_path / "site_b.png")]
    with pytest.raises(ExperimentError, match="pseudo_labels needs the site's own unlabeled tiles"):
        _pseudo_label_overrides({"setting": "sources", "listing": "x.json"})
    with pytest.raises(ValueError, match="pseudo_labels labels the site's own unlabeled tiles"):
        ExperimentConfig(output_dir=str(tmp_path), pseudo_labels=True)
