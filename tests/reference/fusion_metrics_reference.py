#!/usr/bin/env python3
"""Independent NumPy/SciPy reference for tdfusion's fusion metrics (spec section 8), used by the tests to check
the C++ implementation and by the benchmark for a timing baseline.

It follows the classic Python formulations (MMIF-CDDFuse utils/Evaluator.py and the codes it ports) with
different machinery from the C++ code: full 2-D windows and scipy.signal.convolve2d for VIF and Qabf,
scipy.ndimage.uniform_filter for SSIM, numpy.gradient for AG, a 2-D histogram for MI.

Usage:
  fusion_metrics_reference.py --ir DIR --vi DIR --fused DIR [--protocol cddfuse|tdfusion] [--names a,b]
                              [--jobs N] [--json OUT]
Prints (or writes) JSON: {"protocol": ..., "seconds": ..., "images": {stem: {metric: value}}}.
Needs python3-numpy, python3-scipy and python3-pil (Debian packages; /usr/bin/python3).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image
from scipy import ndimage, signal

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tga", ".gif", ".pgm", ".ppm", ".pnm"}


def read_grey8(path):
    """8-bit grey levels as float64: grey files as stored, colour files 0.299 R + 0.587 G + 0.114 B rounded
    (np.round, half to even, on the exact value)."""
    with Image.open(path) as image:
        if image.mode in ("L", "I;16", "I"):
            data = np.asarray(image, dtype=np.float64)
            return data if image.mode == "L" else np.round(data / 257.0)
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    n = 299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2]
    return np.round(n / 1000.0).astype(np.float64)


# ---- single-image metrics -------------------------------------------------------------------------------------

def en(img):
    counts = np.bincount(np.round(img).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / img.size
    return float(-(p * np.log2(p)).sum())


def sd(img):
    return float(np.sqrt(np.mean((img - img.mean()) ** 2)))


def sf(img):
    rf = np.mean(np.diff(img, axis=1) ** 2)
    cf = np.mean(np.diff(img, axis=0) ** 2)
    return float(math.sqrt(rf + cf))


def ag(img):
    gy, gx = np.gradient(img)  # central inside, one-sided at the border
    return float(np.mean(np.sqrt((gx ** 2 + gy ** 2) / 2.0)))


# ---- pair metrics ---------------------------------------------------------------------------------------------

def mi(a, b):
    joint, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=256, range=[[-0.5, 255.5], [-0.5, 255.5]])
    pab = joint / joint.sum()
    pa = pab.sum(axis=1, keepdims=True)
    pb = pab.sum(axis=0, keepdims=True)
    nz = pab > 0
    return max(float((pab[nz] * np.log(pab[nz] / (pa @ pb)[nz])).sum()), 0.0)


def corr(x, y):
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


def scd(a, b, f):
    return corr(a, f - b) + corr(b, f - a)


def gaussian_window(n):
    sigma = n / 5.0
    r = (n - 1) / 2.0
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h / h.sum()


def vif(ref, dist, sigma_nsq=2.0, eps=1e-10):
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        win = np.rot90(gaussian_window(n), 2)
        if scale > 1:
            ref = signal.convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = signal.convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1 = signal.convolve2d(ref, win, mode="valid")
        mu2 = signal.convolve2d(dist, win, mode="valid")
        s1 = signal.convolve2d(ref * ref, win, mode="valid") - mu1 * mu1
        s2 = signal.convolve2d(dist * dist, win, mode="valid") - mu2 * mu2
        s12 = signal.convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g = np.where(low1, 0.0, g)
        sv = np.where(low1, s2, sv)
        s1 = np.where(low1, 0.0, s1)
        low2 = s2 < eps
        g = np.where(low2, 0.0, g)
        sv = np.where(low2, 0.0, sv)
        negative = g < 0
        sv = np.where(negative, s2, sv)
        g = np.where(negative, 0.0, g)
        sv = np.where(sv <= eps, eps, sv)
        num += np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1.0 + s1 / sigma_nsq))
    value = num / den if den != 0 else float("nan")
    return 1.0 if np.isnan(value) else float(value)


def _edges(img):
    sx = signal.convolve2d(img, np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]), mode="same")
    sy = signal.convolve2d(img, np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]]), mode="same")
    g = np.hypot(sx, sy)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(sx == 0, math.pi / 2, np.arctan(sy / np.where(sx == 0, 1.0, sx)))
    return g, angle


def _preservation(g_s, a_s, g_f, a_f):
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(g_s > g_f, g_f / g_s, np.where(g_s == g_f, g_f, g_s / g_f))
    agreement = 1.0 - np.abs(a_s - a_f) / (math.pi / 2)
    qg = 0.9994 / (1.0 + np.exp(-15.0 * (ratio - 0.5)))
    qa = 0.9879 / (1.0 + np.exp(-22.0 * (agreement - 0.8)))
    return qg * qa


def qabf(a, b, f):
    ga, aa = _edges(a)
    gb, ab = _edges(b)
    gf, af = _edges(f)
    numerator = np.sum(_preservation(ga, aa, gf, af) * ga + _preservation(gb, ab, gf, af) * gb)
    return float(numerator / np.sum(ga + gb))


def ssim(x, y, data_range, win=7, k1=0.01, k2=0.03):
    cov_norm = win * win / (win * win - 1.0)
    ux = ndimage.uniform_filter(x, size=win)
    uy = ndimage.uniform_filter(y, size=win)
    vx = cov_norm * (ndimage.uniform_filter(x * x, size=win) - ux * ux)
    vy = cov_norm * (ndimage.uniform_filter(y * y, size=win) - uy * uy)
    vxy = cov_norm * (ndimage.uniform_filter(x * y, size=win) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


# ---- protocols ------------------------------------------------------------------------------------------------

def evaluate(a, b, f, protocol):
    if protocol == "cddfuse":
        return {"EN": en(f), "SD": sd(f), "SF": sf(f), "AG": ag(f), "MI": mi(f, a) + mi(f, b), "SCD": scd(a, b, f),
                "VIF": vif(a, f) + vif(b, f), "Qabf": qabf(a, b, f),
                "SSIM": ssim(f, a, 2.0) + ssim(f, b, 2.0)}
    a8, b8, f8 = (np.floor(x) for x in (a, b, f))  # np.uint8(...)
    return {"EN": en(f), "SF": sf(f), "SCD": scd(a, b, f), "VIF": (vif(a, f) + vif(b, f)) / 2,
            "Qabf": qabf(a, b, f), "SSIM": (ssim(f8, a8, 255.0) + ssim(f8, b8, 255.0)) / 2}


def stems(folder):
    found = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            found[stem] = os.path.join(folder, name)
    return found


def evaluate_one(job):
    stem, paths, protocol = job
    a, b, f = (read_grey8(p) for p in paths)
    return stem, evaluate(a, b, f, protocol)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ir", required=True)
    parser.add_argument("--vi", required=True)
    parser.add_argument("--fused", required=True)
    parser.add_argument("--protocol", default="cddfuse", choices=["cddfuse", "tdfusion"])
    parser.add_argument("--names", default="", help="comma-separated stems (default: all common stems)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--json", default="", help="write the JSON here instead of stdout")
    args = parser.parse_args()

    ir, vi, fused = stems(args.ir), stems(args.vi), stems(args.fused)
    common = sorted(set(ir) & set(vi) & set(fused))
    if args.names:
        wanted = args.names.split(",")
        missing = [n for n in wanted if n not in common]
        if missing:
            sys.exit("no complete triplet for: " + ", ".join(missing))
        common = wanted
    jobs = [(s, (ir[s], vi[s], fused[s]), args.protocol) for s in common]
    start = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.Pool(args.jobs) as pool:
            results = dict(pool.map(evaluate_one, jobs))
    else:
        results = dict(map(evaluate_one, jobs))
    seconds = time.perf_counter() - start
    text = json.dumps({"protocol": args.protocol, "seconds": seconds, "images": results}, indent=1)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
