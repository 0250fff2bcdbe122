from __future__ import annotations

import json
import os
import tempfile
import unittest

import numpy as np
import torch

from monai_histodiff.metrics import classification_report, plot_confusion_matrix, write_report_json

# 4 classes; C (2) is never predicted, D (3) is absent from y_true but predicted once.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 3, 0, 1]
NAMES = ["A", "B", "C", "D"]
# Hand computation. Confusion matrix (rows true, cols predicted):
#   A: [3, 1, 0, 0]    B: [0, 2, 0, 1]    C: [1, 1, 0, 0]    D: [0, 0, 0, 0]
# accuracy = trace / N = (3 + 2) / 9 = 5/9
#   class  tp fp fn tn   precision       sensitivity     specificity       F1 = 2tp / (2tp + fp + fn)
#   A      3  1  1  4    3/4             3/4             4/5               6/8 = 3/4
#   B      2  2  1  4    2/4             2/3             4/6               4/7
#   C      0  0  2  7    0/0 -> 0        0/2 = 0         7/7 = 1           0/2 = 0
#   D      0  1  0  8    0/1 = 0         0/0 -> None     8/9               0/1 = 0
# macro over classes present in y_true (A, B, C):
#   sensitivity = (3/4 + 2/3 + 0) / 3, specificity = (4/5 + 2/3 + 1) / 3, F1 = (3/4 + 4/7 + 0) / 3
# weighted by support (4, 3, 2): sensitivity = (3 + 2 + 0) / 9 = accuracy, F1 = (4*3/4 + 3*4/7) / 9
CM = [[3, 1, 0, 0], [0, 2, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]]


class TestClassificationReport(unittest.TestCase):
    def test_hand_computed(self):
        r = classification_report(Y_TRUE, Y_PRED, NAMES)
        self.assertEqual(r["confusion_matrix"], CM)
        self.assertEqual(r["num_samples"], 9)
        self.assertAlmostEqual(r["accuracy"], 5 / 9)
        self.assertAlmostEqual(r["macro_sensitivity"], (3 / 4 + 2 / 3 + 0) / 3)
        self.assertAlmostEqual(r["macro_specificity"], (4 / 5 + 2 / 3 + 1) / 3)
        self.assertAlmostEqual(r["macro_f1"], (3 / 4 + 4 / 7 + 0) / 3)
        self.assertAlmostEqual(r["macro_precision"], (3 / 4 + 1 / 2 + 0) / 3)
        self.assertAlmostEqual(r["weighted_sensitivity"], r["accuracy"])
        self.assertAlmostEqual(r["weighted_f1"], (4 * 3 / 4 + 3 * 4 / 7) / 9)
        pc = r["per_class"]
        self.assertEqual([pc[n]["support"] for n in NAMES], [4, 3, 2, 0])
        for name, (prec, sens, spec, f1) in {
            "A": (3 / 4, 3 / 4, 4 / 5, 3 / 4),
            "B": (1 / 2, 2 / 3, 2 / 3, 4 / 7),
            "C": (0.0, 0.0, 1.0, 0.0),
        }.items():
            self.assertAlmostEqual(pc[name]["precision"], prec)
            self.assertAlmostEqual(pc[name]["sensitivity"], sens)
            self.assertAlmostEqual(pc[name]["specificity"], spec)
            self.assertAlmostEqual(pc[name]["f1"], f1)
        self.assertIsNone(pc["D"]["sensitivity"])
        self.assertAlmostEqual(pc["D"]["specificity"], 8 / 9)
        self.assertEqual((pc["D"]["precision"], pc["D"]["f1"]), (0.0, 0.0))
        self.assertEqual(r["absent_classes"], ["D"])

    def test_one_hot_and_tensor_inputs_agree(self):
        scores = torch.nn.functional.one_hot(torch.tensor(Y_PRED), 4).float() * 0.7
        r1 = classification_report(np.array(Y_TRUE), scores, NAMES)
        r2 = classification_report(Y_TRUE, Y_PRED, NAMES)
        self.assertEqual(r1, r2)
        with self.assertRaises(ValueError):
            classification_report([0, 1], [0], NAMES)
        with self.assertRaises(ValueError):
            classification_report([0, 4], [0, 1], NAMES)

    def test_files(self):
        r = classification_report(Y_TRUE, Y_PRED, NAMES)
        with tempfile.TemporaryDirectory() as tmp:
            jpath, ppath = os.path.join(tmp, "a", "report.json"), os.path.join(tmp, "cm.png")
            write_report_json(r, jpath)
            with open(jpath) as f:
                self.assertEqual(json.load(f)["confusion_matrix"], CM)
            plot_confusion_matrix(r["confusion_matrix"], NAMES, ppath)
            plot_confusion_matrix(torch.tensor(CM), NAMES, ppath + "2.png", normalize=False)
            for p in (ppath, ppath + "2.png"):
                with open(p, "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
    unittest.main()
