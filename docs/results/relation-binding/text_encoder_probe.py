"""Throwaway: does each MiniLM layer's colour-token embedding say which half its object is in?"""
import numpy as np, torch
from sklearn.linear_model import LogisticRegression
from pnpguide.embedded import shapes
from pnpguide.loading import load_pipeline
pipe = load_pipeline(None)
tok, enc = pipe.tokenizer, pipe.text_encoder
scenes = [s for s in (shapes.sample_scene(i, 5, "train") for i in range(6000)) if len(s.objects) == 2][:2500]
caps = [s.caption for s in scenes]
batch = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
with torch.no_grad():
    out = enc(**batch, output_hidden_states=True)
X_by_layer = {l: [] for l in range(len(out.hidden_states))}
y = []
for n, s in enumerate(scenes):
    ids = batch.input_ids[n].tolist()
    words = tok.convert_ids_to_tokens(ids)
    colour_positions = [i for i, w in enumerate(words) if w in shapes.COLOURS]
    first_is_low = s.relation in ("above", "left of")  # object 0 in the first (top/left) half
    for k, pos in enumerate(colour_positions[:2]):
        for l in X_by_layer:
            X_by_layer[l].append(out.hidden_states[l][n, pos].numpy())
        y.append(int((k == 0) == first_is_low))  # 1: this colour's object is in the top/left half
y = np.array(y)
split = len(y) * 4 // 5
for l, X in X_by_layer.items():
    X = np.array(X)
    clf = LogisticRegression(max_iter=2000).fit(X[:split], y[:split])
    print(f"layer {l}: held-out accuracy {clf.score(X[split:], y[split:]):.3f}")
