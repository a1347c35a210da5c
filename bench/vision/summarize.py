#!/usr/bin/env python3
"""Summaries of the vision benchmarks, standard library only.

  summarize.py compare A.safetensors B.safetensors   # tensor-by-tensor difference
  summarize.py table DIR                               # AdvMoE table (markdown) from eval JSON
  summarize.py rws DIR CORRUPTION...                   # RWS study tables (markdown)
"""
import json, math, os, re, struct, sys


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = data[a:b]
    return out


def compare(a, b):
    ta, tb = read_safetensors(a), read_safetensors(b)
    if set(ta) != set(tb):
        print(f"tensor names differ: {sorted(set(ta) ^ set(tb))}")
        sys.exit(1)
    total = same = 0
    worst = 0.0
    for name in ta:
        if ta[name] == tb[name]:
            k = len(ta[name]) // 4
            total += k
            same += k
            continue
        va = struct.unpack(f"<{len(ta[name]) // 4}f", ta[name])
        vb = struct.unpack(f"<{len(tb[name]) // 4}f", tb[name])
        for x, y in zip(va, vb):
            total += 1
            if x == y:
                same += 1
            else:
                worst = max(worst, abs(x - y))
    print(f"{same}/{total} weights bit-identical ({100.0 * same / max(total, 1):.3f}%), max |diff| {worst:.3g}")


def load(path):
    with open(path) as f:
        return json.load(f)


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def table(d):
    times = {}
    tpath = os.path.join(d, "times.txt")
    if os.path.exists(tpath):
        for line in open(tpath):
            name, _, secs = line.split()
            times[name] = float(secs)
    rows = {}
    for fn in sorted(os.listdir(d)):
        m = re.match(r"(.+)-(\w+?\d+)-(dense-at|moe-at|moe-trades|moe-advmoe)-s(\d+)\.json$", fn)
        if not m:
            continue
        data, arch, row, seed = m.groups()
        r = load(os.path.join(d, fn))
        res = r["results"][0]
        key = (data, arch, row)
        rows.setdefault(key, []).append(
            (res["clean_acc"], res["robust_acc"], r["macs"], times.get(fn[:-5]), int(seed)))
    order = {"dense-at": 0, "moe-at": 1, "moe-trades": 2, "moe-advmoe": 3}
    label = {"dense-at": "dense + PGD-AT", "moe-at": "MoE + vanilla PGD-AT", "moe-trades": "MoE + TRADES (joint)", "moe-advmoe": "MoE + AdvMoE"}
    print("| data | model | seeds | standard acc % | PGD-10 robust acc % | M multiply-adds / image | train time / run |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(rows, key=lambda k: (k[0], k[1], order[k[2]])):
        v = rows[key]
        c, cs = mean_std([100 * x[0] for x in v])
        r, rs = mean_std([100 * x[1] for x in v])
        t = [x[3] for x in v if x[3] is not None]
        tt = f"{sum(t) / len(t) / 60:.1f} min" if t else "?"
        seeds = ",".join(str(x[4]) for x in sorted(v, key=lambda x: x[4]))
        print(f"| {key[0]} | {key[1]} {label[key[2]]} | {seeds} | {c:.2f} ± {cs:.2f} | {r:.2f} ± {rs:.2f} | {v[0][2] / 1e6:.2f} | {tt} |")
    fpath = os.path.join(d, "failed.txt")
    if os.path.exists(fpath):
        print()
        print("Runs the trainer stopped (not in the means above):")
        print()
        for line in open(fpath):
            name, _, why = line.strip().partition(" ")
            print(f"- `{name}`: {why.removeprefix('error: ')}")


def acc(path):
    return 100 * load(path)["results"][0]["clean_acc"]


def rws(d, corruptions):
    j = lambda n: os.path.join(d, n)
    print("| corruption | model | corrupted acc % | clean acc % |")
    print("|---|---|---|---|")
    for c in corruptions:
        for m, lab in [("clean", "clean fine-tune"), (f"robust-{c}", "robust fine-tune"),
                       (f"patched-{c}", "clean + signature (alpha 1)"),
                       (f"patched-bn-{c}", "clean + signature, BN re-estimated")]:
            a, b = j(f"eval-{m}-on-{c}.json"), j(f"eval-{m}-on-clean.json")
            if os.path.exists(a) and os.path.exists(b):
                print(f"| {c} | {lab} | {acc(a):.2f} | {acc(b):.2f} |")
    c1 = corruptions[0]
    print()
    print(f"| alpha | {c1} acc % | clean acc % |")
    print("|---|---|---|")
    for a in ["0", "0.25", "0.5", "0.75", "1.0", "1.25", "1.5"]:
        p, q = j(f"alpha-{a}-on-{c1}.json"), j(f"alpha-{a}-on-clean.json")
        if os.path.exists(p):
            print(f"| {a} | {acc(p):.2f} | {acc(q):.2f} |")
    if len(corruptions) > 1:
        c2 = corruptions[1]
        print()
        print(f"Composed ({c1} + {c2}, alpha 1 each): {c1} {acc(j(f'composed-on-{c1}.json')):.2f}%, "
              f"{c2} {acc(j(f'composed-on-{c2}.json')):.2f}%, clean {acc(j('composed-on-clean.json')):.2f}%")
    print()
    sizes = {}
    if os.path.exists(j("size-sweep.txt")):
        for line in open(j("size-sweep.txt")):
            kv = dict(x.split("=") for x in line.split())
            sizes[(kv["K"], kv["levels"])] = (int(kv["bytes"]), int(kv["full"]))
    print(f"| first K layers | {c1} acc % (16 levels) | clean acc % | 16 levels | 256 levels | f32 |")
    print("|---|---|---|---|---|---|")
    for k in ["2", "4", "6", "8", "13"]:
        p, q = j(f"k{k}-on-{c1}.json"), j(f"k{k}-on-clean.json")
        if not os.path.exists(p):
            continue
        cells = []
        for lv in ["16", "256", "f32"]:
            b, full = sizes.get((k, lv), (0, 1))
            cells.append(f"{b / 1024:.1f} KiB ({full / max(b, 1):.0f}x smaller)")
        print(f"| {k} | {acc(p):.2f} | {acc(q):.2f} | " + " | ".join(cells) + " |")
    if os.path.exists(j("removal.txt")):
        print()
        print("Removal: " + open(j("removal.txt")).read().strip())


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif cmd == "table":
        table(sys.argv[2])
    elif cmd == "rws":
        rws(sys.argv[2], sys.argv[3:])
    else:
        print(__doc__)
        sys.exit(2)
