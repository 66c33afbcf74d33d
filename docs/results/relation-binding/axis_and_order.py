"""Throwaway: among images with the right two objects, is the relation right, swapped, or on the wrong axis?"""
import collections, sys, torch
from diffusers import StableDiffusionPipeline
from pnpguide.embedded import shapes
from pnpguide.embedded.adherence import parse_caption, detect, _matches
from pnpguide.evaluation.sampling import generate_images
torch.set_num_threads(2)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
scenes = [s for s in (shapes.sample_scene(i, 777, "train") for i in range(2000)) if len(s.objects) == 2][:150]
caps = [s.caption for s in scenes]
images = generate_images(pipe, caps, 7.5, 25, seed=0, progress=False)
tally = collections.Counter()
for im, c in zip(images, caps):
    spec = parse_caption(c); bg, found = detect(im)
    if len(found) != 2: continue
    for a, b in ((0, 1), (1, 0)):
        if _matches(found[a], spec.objects[0]) and _matches(found[b], spec.objects[1]):
            dx = found[b].center[0] - found[a].center[0]; dy = found[b].center[1] - found[a].center[1]
            drawn = ("above" if dy > 0 else "below") if abs(dy) > abs(dx) else ("left of" if dx > 0 else "right of")
            axis_ok = (drawn in ("above", "below")) == (spec.relation in ("above", "below"))
            tally["right" if drawn == spec.relation else ("swapped" if axis_ok else "wrong axis")] += 1
            tally[f"{spec.relation} -> {drawn}"] += 1
            break
print(sys.argv[1], dict(sorted(tally.items())))
