from __future__ import annotations

import unittest

import numpy as np
import torch

from monai_histodiff.selection import (
    class_centroids,
    distances_to_centroids,
    extract_features,
    extract_features_and_probs,
    l2_normalize,
    real_distance_thresholds,
)

# hand-made 2-D "features": class 0 around (1, 0), class 1 around (0, 1)
REAL = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.6, 0.0], [0.0, 1.0], [0.0, 0.5], [0.2, 0.9]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


class TestCentroids(unittest.TestCase):
    def test_centroids_are_class_means(self):
        c = class_centroids(REAL, LABELS, 2)
        torch.testing.assert_close(c, torch.tensor([[0.8, 0.2 / 3], [0.2 / 3, 0.8]]))

    def test_distances(self):
        d = distances_to_centroids(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
        torch.testing.assert_close(d, torch.tensor([[0.0, 3.0], [5.0, 4.0]]))

    def test_thresholds_are_percentiles_of_own_distances(self):
        c = class_centroids(REAL, LABELS, 2)
        own = distances_to_centroids(REAL, c)[torch.arange(6), LABELS]
        thr = real_distance_thresholds(REAL, LABELS, c, 50)
        torch.testing.assert_close(thr[0], own[:3].median())
        torch.testing.assert_close(thr[1], own[3:].median())
        thr100 = real_distance_thresholds(REAL, LABELS, c, 100)
        torch.testing.assert_close(thr100, torch.stack([own[:3].max(), own[3:].max()]))

    def test_class_without_real_tiles_is_named(self):
        with self.assertRaisesRegex(ValueError, r"\[2\]"):
            class_centroids(REAL, LABELS, 3)
        c = torch.zeros(3, 2)
        with self.assertRaisesRegex(ValueError, "class index 2"):
            real_distance_thresholds(REAL, LABELS, c, 90)
        with self.assertRaises(ValueError):
            real_distance_thresholds(REAL, LABELS, c[:2], 101)

    def test_extract_features(self):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(3, 4)
                self.drop = torch.nn.Dropout(0.5)

            def features(self, x):
                return self.drop(self.lin(x))

        torch.manual_seed(0)
        net = Net().train()
        x = torch.randn(10, 3)
        batches = [{"image": x[:6], "label": torch.arange(6) % 2}, {"image": x[6:], "label": torch.arange(4) % 2}]
        f, y = extract_features(net, batches)
        self.assertEqual(f.dtype, torch.float32)
        self.assertEqual(tuple(f.shape), (10, 4))
        torch.testing.assert_close(f.norm(dim=1), torch.ones(10))
        torch.testing.assert_close(f, l2_normalize(net.lin(x).detach()))  # eval mode: no dropout
        self.assertTrue(net.training)  # mode restored
        np.testing.assert_array_equal(y.numpy(), np.r_[np.arange(6) % 2, np.arange(4) % 2])
        f2, y2 = extract_features(torch.nn.Linear(3, 2), [x], feature_fn=None)
        self.assertIsNone(y2)
        self.assertEqual(tuple(f2.shape), (10, 2))

    def test_extract_features_and_probs_one_pass(self):
        class Classifier(torch.nn.Module):
            """features -> classify, counting forward passes of the feature trunk."""

            def __init__(self):
                super().__init__()
                self.trunk, self.head, self.calls = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), 0

            def features(self, x):
                self.calls += 1
                return self.trunk(x)

            def classify(self, f):
                return self.head(f)

            def forward(self, x):
                return self.classify(self.features(x))

        torch.manual_seed(0)
        net, x = Classifier(), torch.randn(10, 3)
        f, y, p = extract_features_and_probs(net, [x[:6], x[6:]])
        self.assertEqual(net.calls, 2)  # one trunk pass per batch: probabilities come from the same features
        self.assertIsNone(y)
        torch.testing.assert_close(f, l2_normalize(net.trunk(x).detach()))
        torch.testing.assert_close(p, torch.softmax(net(x), dim=1).detach())
        torch.testing.assert_close(p.sum(dim=1), torch.ones(10))
        # no classify(): the logits are the model output
        lin = torch.nn.Linear(3, 2)
        _, _, p2 = extract_features_and_probs(lin, [x])
        torch.testing.assert_close(p2, torch.softmax(lin(x), dim=1).detach())
        with self.assertRaisesRegex(ValueError, "logits must be"):
            extract_features_and_probs(lin, [x], logits_fn=lambda m, xb, fb: fb[:, 0])


if __name__ == "__main__":
    unittest.main()
