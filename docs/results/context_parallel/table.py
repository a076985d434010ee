"""The context-parallel table from `cp.sh`'s outputs: python docs/results/context_parallel/table.py DIR...

One row per (attention, T, N): tokens/s, step time, peak memory per device, the speed against one GPU
(N = 1) at the same T, or else at the longest T one GPU ran (per token, so the ratio also counts the
longer sequence's extra attention work), and the largest relative difference of the first steps'
training losses against the N = 1 run at the same T."""
import argparse
import json
import pathlib
import re


def load(dirs):
    runs = {}
    for d in dirs:
        for path in sorted(pathlib.Path(d).glob("cp_*_N*_T*.json")):
            attention, n, t = re.fullmatch(r"cp_(\w+)_N(\d+)_T(\d+)", path.stem).groups()
            losses = [json.loads(line) for line in open(path.with_suffix(".jsonl"))]
            losses = [r["loss"] for r in losses if r.get("kind") == "train"]
            runs[attention, int(t), int(n)] = dict(json.load(open(path)), losses=losses)
    return runs


def table(runs) -> str:
    lines = ["| attention | T | devices (context) | tokens/s | s/step | peak GiB per device | vs one GPU | first losses vs one GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for attention, t, n in sorted(runs):
        r = runs[attention, t, n]
        one = [k for k in runs if k[0] == attention and k[2] == 1]
        ref = runs.get((attention, t, 1)) or (runs[max(one)] if one else None)
        ref_t = t if (attention, t, 1) in runs else (max(one)[1] if one else None)
        speed = f"{r['median_tokens_per_s'] / ref['median_tokens_per_s']:.2f}x" if ref and n > 1 else "–"
        if ref and n > 1 and ref_t != t:
            speed += f" (one GPU at T = {ref_t})"
        same_t = runs.get((attention, t, 1))
        if same_t and n > 1:
            k = min(len(same_t["losses"]), len(r["losses"]))
            diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:k], same_t["losses"][:k]))
            agree = f"{diff:.1e} (max rel., {k} steps)"
        else:
            agree = "–"
        mem = r.get("peak_memory_gib")
        lines.append(f"| {attention} | {t:,} | {n} | {r['median_tokens_per_s']:,.0f} | {r['median_step_s']:.3f} | "
                     f"{'–' if mem is None else f'{mem:.1f}'} | {speed} | {agree} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="folders with cp.sh's cp_<attention>_N<N>_T<T>.json/.jsonl files")
    print(table(load(p.parse_args().dirs)))


if __name__ == "__main__":
    main()
