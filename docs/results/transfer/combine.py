"""One table from the transfer reports in this folder: python combine.py > curve.md"""
import json
from pathlib import Path

HERE = Path(__file__).parent
GUIDE, FT, TINY, CARRY = "guide:output-first5-neg + carry", "guide:output-first5-neg + ft carry", "guide:tiny", "cfg + carry 5"
rows = []
for name in ("bar-s0-05", "bar-s1", "styles-s1"):
    path = HERE / f"{name}.json"
    if path.is_file():
        rows += json.loads(path.read_text())["rows"]
adapted = {(r["prompts"], r["guidance_scale"]): r for r in json.loads((HERE / "bar-s1-adapted.json").read_text())["rows"]}
order = {"bar-lora": 0, "outline-lora": 1, "pastel-full": 2}
rows.sort(key=lambda r: (order[r["model"]], r["prompts"] != "ordinary", r["scale"], r["guidance_scale"]))
f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
print("| model | scale | prompts | w | distance | cos step 1 / 2-5 / 6+ | image gap closed: default guide + carry / + ft carry / tiny / "
      "training-free carry | adherence: base CFG / CFG / none / default guide / tiny / training-free carry | FID: CFG / none / "
      "default guide / tiny / training-free carry |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    g, a, fid = r["image_gap_closed"], r["adherence"], r["fid"]
    cos = " / ".join(f(c) for c in r["cosine_summary"])
    gaps = " / ".join(f(g[k]) for k in (GUIDE, FT, TINY, CARRY))
    base_cfg = "–" if r["model"] != "bar-lora" else f(a["base cfg"])  # style fine-tunes: the base's flat images, judged in the bar-lora rows
    adh = " / ".join([base_cfg] + [f(a[k]) for k in ("cfg", "none", GUIDE, TINY, CARRY)])
    fids = " / ".join("–" if fid[k] is None else f"{fid[k]:.0f}" for k in ("cfg", "none", GUIDE, TINY, CARRY))
    print(f"| {r['model']} | {r['scale']:g} | {r['prompts']} | {r['guidance_scale']:g} | {r['distance']:.2f} | {cos} | {gaps} | {adh} | {fids} |")
print()
print("The default guide adapted on bar-lora's own teacher trajectories (1,500 steps), at scale 1, image gap closed with "
      "its carry / adherence:")
print()
print("| prompts | w | adapted guide + carry: gap closed | adherence | (unadapted: gap closed / adherence) |")
print("|---|---|---|---|---|")
for (group, w), r in sorted(adapted.items(), key=lambda kv: (kv[0][0] != "ordinary", kv[0][1])):
    base_row = next(x for x in rows if x["model"] == "bar-lora" and x["scale"] == 1 and x["prompts"] == group and x["guidance_scale"] == w)
    print(f"| {group} | {w:g} | {r['image_gap_closed']['guide:guide + carry']:.2f} | {r['adherence']['guide:guide + carry']:.2f} | "
          f"{base_row['image_gap_closed'][GUIDE]:.2f} / {base_row['adherence'][GUIDE]:.2f} |")
