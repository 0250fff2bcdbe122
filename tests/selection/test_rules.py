from __future__ import annotations

import unittest

import numpy as np
import torch

from monai_histodiff.selection import (
    DECISION_COLUMNS,
    SelectionResult,
    balance_to_quota_fraction,
    quotas_from_ratio,
    select_candidates,
)

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
        self.assertEqual(
            s[0],
            {"candidates": 6, "eligible": 3, "quota": 2, "selected": 2, "trimmed": 0, "kept": 2, "shortfall": 0,
             "fill": 1.0},
        )
        self.assertEqual(
            s[1],
            {"candidates": 1, "eligible": 1, "quota": 3, "selected": 1, "trimmed": 0, "kept": 1, "shortfall": 2,
             "fill": 1 / 3},
        )

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
        rows = r.to_rows([f"t{i}.png" for i in range(7)], ["TUM", "STR"], manifest_confidences=[0.5] * 6 + [None])
        self.assertEqual(len(rows), 7)
        for row in rows:
            self.assertEqual(tuple(row), DECISION_COLUMNS)
        self.assertEqual(rows[2]["class"], "TUM")
        self.assertEqual(rows[2]["nearest_class"], "STR")
        self.assertFalse(rows[2]["kept"])
        self.assertAlmostEqual(rows[0]["confidence"], 0.9, places=6)
        self.assertEqual((rows[0]["manifest_confidence"], rows[6]["manifest_confidence"]), (0.5, ""))
        self.assertEqual(r.to_rows(["x"] * 7)[0]["class"], "0")
        self.assertEqual(r.to_rows(["x"] * 7)[0]["manifest_confidence"], "")

    def test_balance_to_quota_fraction(self):
        # every class drops to the smallest fill (3/6 = 50%), exact fractions, no class grows
        self.assertEqual(balance_to_quota_fraction([10, 3, 0], [10, 6, 0]), [5, 3, 0])
        self.assertEqual(balance_to_quota_fraction([20, 0], [20, 20]), [0, 0])
        self.assertEqual(balance_to_quota_fraction([20, 20], [20, 20]), [20, 20])
        # fill 1/3: floor(100/3) = 33; the short class itself is never trimmed
        self.assertEqual(balance_to_quota_fraction([100, 1], [100, 3]), [33, 1])
        # 7/10 of 30 is exactly 21 (no float round-down to 20)
        self.assertEqual(balance_to_quota_fraction([7, 30], [10, 30]), [7, 21])
        unlimited = np.iinfo(np.int64).max
        self.assertEqual(balance_to_quota_fraction([4, 9], [unlimited, unlimited]), [4, 9])
        with self.assertRaisesRegex(ValueError, "exceeds the quota"):
            balance_to_quota_fraction([5, 1], [4, 4])
        with self.assertRaisesRegex(ValueError, "entries"):
            balance_to_quota_fraction([5], [4, 4])

    def test_skewed_candidates_balance(self):
        # class 0: four tiles that pass; class 1: three tiles nearer class 0's centroid (none passes)
        feats = torch.tensor([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [0.4, 0.0], [1.0, 0.0], [1.1, 0.0], [1.2, 0.0]])
        labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
        quotas = {0: 3, 1: 3}
        none = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, quotas=quotas, balance="none")
        self.assertEqual([none.per_class_summary()[k]["kept"] for k in (0, 1)], [3, 0])
        self.assertEqual(list(none.reason[:4]), ["kept", "kept", "kept", "over_quota"])
        prop = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, quotas=quotas, balance="proportional")
        s = prop.per_class_summary()
        self.assertEqual((s[0]["selected"], s[0]["trimmed"], s[0]["kept"], s[0]["fill"]), (3, 3, 0, 0.0))
        self.assertEqual((s[1]["kept"], s[1]["shortfall"]), (0, 3))
        self.assertFalse(prop.kept.any())
        expected = ["balance_trimmed"] * 3 + ["over_quota"] + ["nearest_centroid_is_other_class"] * 3
        self.assertEqual(list(prop.reason), expected)
        self.assertEqual(prop.reason_counts()[0]["balance_trimmed"], 3)
        # one class-1 tile passes (quota 3 -> fill 1/3): class 0 keeps its single closest tile
        feats2 = torch.cat([feats, torch.tensor([[9.5, 0.0]])])
        labels2 = torch.cat([labels, torch.tensor([1])])
        part = select_candidates(feats2, labels2, CENTROIDS, THRESHOLDS, quotas=quotas, balance="proportional")
        np.testing.assert_array_equal(part.kept_indices, [0, 7])
        self.assertEqual(list(part.reason[:3]), ["kept", "balance_trimmed", "balance_trimmed"])
        # random mode: the same rule, the last drawn tiles are trimmed
        rnd = select_candidates(feats, labels, CENTROIDS, THRESHOLDS, quotas={0: 4, 1: 6}, mode="random",
                                balance="proportional")
        self.assertEqual([rnd.per_class_summary()[k]["kept"] for k in (0, 1)], [2, 3])  # fill 3/6 = 50%
        self.assertEqual(int((rnd.reason == "balance_trimmed").sum()), 2)
        with self.assertRaisesRegex(ValueError, "balance"):
            select_candidates(feats, labels, CENTROIDS, THRESHOLDS, balance="equal")

    def test_quotas_from_ratio(self):
        self.assertEqual(quotas_from_ratio({0: 10, 1: 3}, 0.5), {0: 5, 1: 2})
        self.assertEqual(quotas_from_ratio([10, 3], 2.0), {0: 20, 1: 6})


if __name__ == "__main__":
    unittest.main()
