from __future__ import annotations

import csv
import json
import os
import tempfile
import unittest

import numpy as np
import torch

from monai_histodiff.selection import (
    DECISION_COLUMNS,
    plot_decisions_by_class,
    plot_distance_histograms,
    select_candidates,
    write_decisions_csv,
    write_selection_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class TestReport(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        cents = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
        feats = torch.tensor([[1.0, 0.0], [6.0, 0.0], [9.0, 0.0]])
        self.result = select_candidates(feats, torch.tensor([0, 0, 1]), cents, torch.tensor([2.0, 2.0]), quotas=[5, 5])

    def test_csv(self):
        path = os.path.join(self.tmp.name, "sub", "decisions.csv")
        write_decisions_csv(self.result.to_rows(["a.png", "b.png", "c.png"], ["A", "B"]), path)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(tuple(rows[0]), DECISION_COLUMNS)
        self.assertEqual([r["reason"] for r in rows], ["kept", "nearest_centroid_is_other_class", "kept"])

    def test_json(self):
        path = os.path.join(self.tmp.name, "report.json")
        write_selection_report({"mode": "selective", "per_class": self.result.per_class_summary()}, path)
        self.assertGreater(os.path.getsize(path), 0)
        with open(path) as f:
            data = json.load(f)
        self.assertEqual(data["per_class"]["0"]["shortfall"], 4)

    def test_png(self):
        path = os.path.join(self.tmp.name, "hist.png")
        rng = np.random.default_rng(0)
        real = [rng.random(50), torch.rand(30)]
        cand = {0: rng.random(20) * 2, 1: []}
        plot_distance_histograms(real, cand, torch.tensor([0.9, 0.8]), ["A", "B"], path)
        self.assertGreater(os.path.getsize(path), 0)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), PNG_MAGIC)

    def test_kept_by_class_png(self):
        path = os.path.join(self.tmp.name, "sub", "kept.png")
        counts = self.result.reason_counts()
        self.assertEqual(counts[0]["kept"], 1)
        self.assertEqual(counts[0]["nearest_centroid_is_other_class"], 1)
        plot_decisions_by_class(counts, [5, None], ["A", "B"], path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), PNG_MAGIC)


if __name__ == "__main__":
    unittest.main()
