"""Tables and a figure of the storage-quality frontier from `make frontier-curve` / `frontier-levers` outputs.

    python docs/frontier.py evaluation_models/frontier --out docs

Reads <folder>/N<budget>/results.json (the budget curve) and <folder>/lever_<name>/results.json (the levers at
N = 100, each compared with its own init_only, or with N100's when the lever keeps the initialisation), checked
by main_evaluate.read_results. Prints Markdown tables (mean ± std over the seeds; they go into docs/results.md)
and writes <out>/frontier.png (linear-probe top-1 against the budget N, one line per row; drawn with Pillow,
which the project already needs). real_init is drawn at its budget N though it stores m real images (over it).
"""
import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main_evaluate  # noqa: E402

CURVE_ROWS = ("distilled", "init_only", "real_init", "krr_st", "random_subset", "no_pretraining")
COLOURS = {"distilled": (200, 30, 30), "init_only": (240, 140, 40), "real_init": (120, 120, 120),
           "krr_st": (40, 90, 200), "random_subset": (40, 160, 70), "no_pretraining": (0, 0, 0)}


def cells(path, key):
    """{row: [values of `key` over its seeds]} of one results.json."""
    saved = main_evaluate.read_results(path)
    return {row: [c[key] for _, c in sorted(by_seed.items(), key=lambda kv: int(kv[0])) if key in c]
            for row, by_seed in saved["cells"].items()}


def mean_std(values, f):
    if not values:
        return "-"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{f}} ± {sd:{f}}"


def curve(folder):
    """{N: (probe cells, fit cells)} of every N<budget>/results.json, by N."""
    found = {}
    for path in folder.glob("N*/results.json"):
        match = re.fullmatch(r"N(\d+)", path.parent.name)
        if match:
            found[int(match.group(1))] = (cells(path, "probe"), cells(path, "fit"))
    return dict(sorted(found.items()))


def curve_table(points):
    head = "| row | " + " | ".join(f"N = {n}: top-1 (%) | fit R²" for n in points) + " |"
    lines = [head, "|---" * (1 + 2 * len(points)) + "|"]
    for row in CURVE_ROWS:
        lines.append(f"| {row} | " + " | ".join(f"{mean_std(p.get(row, []), '.2f')} | {mean_std(f.get(row, []), '.3f')}"
                                                for p, f in points.values()) + " |")
    lines.append("| distilled - init_only | " + " | ".join(
        f"{diff(p, 'distilled', 'init_only', '+.2f')} | {diff(f, 'distilled', 'init_only', '+.3f')}"
        for p, f in points.values()) + " |")
    return lines


def diff(by_row, a, b, f):
    """Difference of two rows' means, with the larger of their stds beside it."""
    if not by_row.get(a) or not by_row.get(b):
        return "-"
    sd = max(statistics.pstdev(v) if len(v) > 1 else 0.0 for v in (by_row[a], by_row[b]))
    return f"{statistics.fmean(by_row[a]) - statistics.fmean(by_row[b]):{f}} (std ≤ {sd:.3f})"


def lever_table(folder, baseline):
    """One line per lever: its distilled row against its own init_only (or N100's) and real_init."""
    lines = ["| lever | distilled top-1 | init_only top-1 | distilled - init_only | fit: distilled | fit: init_only "
             "| fit: distilled - init_only | real_init top-1 / fit |", "|---" * 8 + "|"]
    for path in sorted(folder.glob("lever_*/results.json")):
        p, f = cells(path, "probe"), cells(path, "fit")
        if "init_only" not in p and baseline:  # the lever keeps N100's initial set: its init_only and real_init
            for row in ("init_only", "real_init"):
                p[row], f[row] = baseline[0].get(row, []), baseline[1].get(row, [])
        lines.append(f"| {path.parent.name[len('lever_'):]} | {mean_std(p.get('distilled', []), '.2f')} | "
                     f"{mean_std(p.get('init_only', []), '.2f')} | {diff(p, 'distilled', 'init_only', '+.2f')} | "
                     f"{mean_std(f.get('distilled', []), '.3f')} | {mean_std(f.get('init_only', []), '.3f')} | "
                     f"{diff(f, 'distilled', 'init_only', '+.3f')} | {mean_std(p.get('real_init', []), '.2f')} / "
                     f"{mean_std(f.get('real_init', []), '.3f')} |")
    return lines


def figure(points, path, size=(720, 480), margin=70):
    """Top-1 against the budget N (log scale), one polyline per row, from PIL's drawing primitives."""
    from PIL import Image, ImageDraw
    import math
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    ns = list(points)
    values = [statistics.fmean(v) for p, _ in points.values() for v in p.values() if v]
    lo, hi = math.floor(min(values) - 1), math.ceil(max(values) + 1)
    lx0, lx1 = math.log(min(ns)) - 0.2, math.log(max(ns)) + 0.2
    x = lambda n: margin + (math.log(n) - lx0) / (lx1 - lx0) * (size[0] - 2 * margin - 120)
    y = lambda v: size[1] - margin - (v - lo) / (hi - lo) * (size[1] - 2 * margin)
    d.line([(margin, margin), (margin, size[1] - margin), (size[0] - margin - 120, size[1] - margin)], fill="black")
    for v in range(lo, hi + 1, max(1, (hi - lo) // 8)):
        d.line([(margin - 5, y(v)), (margin, y(v))], fill="black")
        d.text((margin - 35, y(v) - 6), f"{v}", fill="black")
    for n in ns:
        d.line([(x(n), size[1] - margin), (x(n), size[1] - margin + 5)], fill="black")
        d.text((x(n) - 10, size[1] - margin + 10), f"N={n}", fill="black")
    d.text((margin, 20), "CIFAR-10 (cifar10_cpu): linear-probe top-1 (%) vs storage budget N (images); "
                         "real_init stores its m real images (over budget)", fill="black")
    for i, row in enumerate(CURVE_ROWS):
        pts = [(x(n), y(statistics.fmean(p[row]))) for n, (p, _) in points.items() if p.get(row)]
        if len(pts) > 1:
            d.line(pts, fill=COLOURS[row], width=3)
        for px, py in pts:
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=COLOURS[row])
        d.line([(size[0] - 170, 60 + 20 * i), (size[0] - 150, 60 + 20 * i)], fill=COLOURS[row], width=3)
        d.text((size[0] - 145, 54 + 20 * i), row, fill="black")
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    points = curve(args.folder)
    lines = ["Budget curve (linear probe top-1 and teacher fit R², mean ± std over seeds):", ""] + curve_table(points)
    lines += ["", "Levers at N = 100:", ""] + lever_table(args.folder, points.get(100))
    args.out.mkdir(parents=True, exist_ok=True)
    if len(points) > 1:
        figure(points, args.out / "frontier.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
