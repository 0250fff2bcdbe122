from __future__ import annotations

import unittest

import numpy as np
import torch

from monai_histodiff.metrics import FrechetDistanceReport, frechet_distance, frechet_distance_report


class TestFrechet(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(4000, 4, generator=gen, dtype=torch.float64)
        self.b = torch.randn(4000, 4, generator=gen, dtype=torch.float64)

    def test_identical_is_zero(self):
        self.assertAlmostEqual(frechet_distance(self.a, self.a), 0.0, places=6)

    def test_mean_shift(self):
        direction = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64) / 2**0.5  # unit vector
        fds = [frechet_distance(self.a, self.b + s * direction) for s in (0.5, 1.0, 2.0)]
        self.assertLess(fds[0], fds[1])
        self.assertLess(fds[1], fds[2])
        # two Gaussians with equal covariance: FD = ||shift||^2 (+ small finite-sample term)
        for s, fd in zip((0.5, 1.0, 2.0), fds):
            self.assertAlmostEqual(fd, s**2, delta=0.05)

    def test_errors(self):
        with self.assertRaises(ValueError):
            frechet_distance(self.a[:1], self.b)
        with self.assertRaises(ValueError):
            frechet_distance(self.a, self.b[:, :3])

    def test_report(self):
        real_lab = np.arange(4000) % 3
        synth_lab = np.r_[np.zeros(3999, dtype=int), 2]  # class 1 absent, class 2 a single sample
        shift = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        rep = frechet_distance_report(
            self.a, real_lab, self.b + shift, synth_lab, ["A", "B", "C"], "resnet18-crc", num_samples=1000, seed=1
        )
        self.assertIsInstance(rep, FrechetDistanceReport)
        self.assertEqual(rep.metric_name, "FD (resnet18-crc)")
        self.assertFalse(rep.is_fid)
        self.assertNotIn("FID", rep.aliases)
        self.assertEqual((rep.num_real, rep.num_synth), (1000, 1000))
        self.assertAlmostEqual(rep.overall, 1.0, delta=0.4)  # ||shift||^2 = 1, N = 1000 sampling noise
        self.assertEqual(rep.per_class["A"]["num_real"], 1000)
        self.assertIsNotNone(rep.per_class["A"]["fd"])
        for name in ("B", "C"):
            self.assertIsNone(rep.per_class[name]["fd"])
            self.assertIn("fewer than 2", rep.per_class[name]["reason"])
        again = frechet_distance_report(
            self.a, real_lab, self.b + shift, synth_lab, ["A", "B", "C"], "resnet18-crc", num_samples=1000, seed=1
        )
        self.assertEqual(rep.to_dict(), again.to_dict())
        inc = frechet_distance_report(self.a, real_lab, self.b, synth_lab, ["A", "B", "C"], "inception_v3")
        self.assertTrue(inc.is_fid)
        self.assertEqual(inc.aliases, ["FID"])
        self.assertEqual(inc.num_real, 4000)
        with self.assertRaises(ValueError):
            frechet_distance_report(self.a, real_lab, self.b, synth_lab, ["A", "B", "C"], "x", num_samples=5000)


if __name__ == "__main__":
    unittest.main()
