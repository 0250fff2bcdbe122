from __future__ import annotations

import unittest

import numpy as np
import torch

from monai_histodiff.selection import DECISION_COLUMNS, SelectionResult, quotas_from_ratio, select_candidates

CENTROIDS = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
THRESHOLDS = torch.tensor([2.0, 2.0])
# candidates for class 0 unless noted; distances to centroid 0 are the x value
CANDS = torch.tensor(
    [
        [1.0, 0.0],  # 0: kept (2nd closest)
        [0.5, 0.0],  # 1: kept (closest)
        [6.0, 0.0],  # 2: nearer to class 1's centroid
        [3.0, 0.0],  # 3: beyond threshold 2
        [0.2, 0.0],  # 4: low confidence
        [1.5, 0.0],  # 5: eligible but over quota (3rd closest, quota 2)
        [9.0, 0.0],  # 6: class 1, kept
    ]
)
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 1])
CONF = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.1, 0.9, 0.9])


class TestRules(unittest.TestCase):
    def test_selective_reasons_and_quota(self):
        r = select_candidates(CANDS, LABELS, CENTROIDS, THRESHOLDS, CONF, min_confidence=0.5, quotas={0: 2, 1: 3})
        self.assertIsInstance(r, SelectionResult)
        self.assertEqual(
            list(r.reason),
            [
                "kept",
                "kept",
                "nearest_centroid_is_other_class",
                "beyond_distance_threshold",
                "low_confidence",
                "over_quota",
                "kept",
            ],
        )
        np.testing.assert_array_equal(r.kept_indices, [0, 1, 6])
        np.testing.assert_array_equal(r.nearest_class, [0, 0, 1, 0, 0, 0, 1])
        np.testing.assert_allclose(r.distance, [1.0, 0.5, 6.0, 3.0, 0.2, 1.5, 1.0])
        s = r.per_class_summary()
        self.assertEqual(s[0], {"candidates": 6, "eligible": 3, "quota": 2, "kept": 2, "shortfall": 0})
        self.assertEqual(s[1], {"candidates": 1, "eligible": 1, "quota": 3, "kept": 1, "shortfall": 2})

    def test_closest_first_and_no_confidence_filter(self):
        r = select_candidates(CANDS, LABELS, CENTROIDS, THRESHOLDS, quotas=[1, 1])
        # without min_confidence, candidate 4 (distance 0.2) is the closest eligible one
        np.testing.assert_array_equal(r.kept_indices, [4, 6])
        self.assertTrue(np.isnan(r.confidence).all())
        with self.assertRaises(ValueError):
            select_candidates(CANDS, LABELS, CENTROIDS, THRESHOLDS, min_confidence=0.5)
        with self.assertRaises(ValueError):
            select_candidates(CANDS, LABELS, CENTROIDS, THRESHOLDS, mode="greedy")

    def test_random_mode(self):
        rng = np.random.default_rng(0)
        feats = torch.from_numpy(rng.normal(size=(40, 2))).float() * 20  # many would fail the selective rule
        labels = torch.tensor([0] * 25 + [1] * 15)
        kw = dict(quotas={0: 10, 1: 20}, mode="random", seed=3)
        r1 = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, **kw)
        r2 = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, **kw)
        r3 = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, quotas={0: 10, 1: 20}, mode="random", seed=4)
        np.testing.assert_array_equal(r1.kept, r2.kept)
        self.assertFalse(np.array_equal(r1.kept, r3.kept))
        s = r1.per_class_summary()
        self.assertEqual((s[0]["kept"], s[0]["shortfall"]), (10, 0))
        self.assertEqual((s[1]["kept"], s[1]["shortfall"]), (15, 5))
        self.assertEqual(set(r1.reason), {"kept_random", "over_quota"})
        selective = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, quotas={0: 10, 1: 20})
        self.assertLess(selective.kept.sum(), r1.kept.sum())

    def test_rows(self):
        r = select_candidates(CANDS, LABELS, CENTROIDS, THRESHOLDS, CONF, min_confidence=0.5, quotas={0: 2, 1: 3})
        rows = r.to_rows([f"t{i}.png" for i in range(7)], ["TUM", "STR"])
        self.assertEqual(len(rows), 7)
        for row in rows:
            self.assertEqual(tuple(row), DECISION_COLUMNS)
        self.assertEqual(rows[2]["class"], "TUM")
        self.assertEqual(rows[2]["nearest_class"], "STR")
        self.assertFalse(rows[2]["kept"])
        self.assertAlmostEqual(rows[0]["confidence"], 0.9, places=6)
        self.assertEqual(r.to_rows(["x"] * 7)[0]["class"], "0")

    def test_quotas_from_ratio(self):
        self.assertEqual(quotas_from_ratio({0: 10, 1: 3}, 0.5), {0: 5, 1: 2})
        self.assertEqual(quotas_from_ratio([10, 3], 2.0), {0: 20, 1: 6})


if __name__ == "__main__":
    unittest.main()
