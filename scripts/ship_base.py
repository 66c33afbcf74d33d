"""Copy a trained base pipeline into the package as the embedded default, re-saved by the current code.

The text encoder is frozen during training, so it is rebuilt from the installed all-MiniLM-L6-v2
(same pruned weights, plus the unused pooler that keeps transformers from warning about missing keys),
cut to as many layers as the trained pipeline's (base-te3 conditions on the first 3).
"""

import shutil
import sys
from pathlib import Path

from pnpguide.embedded import components
from pnpguide.loading import default_base_dir, load_pipeline, save_pipeline

if __name__ == "__main__":
    pipe = load_pipeline(Path(sys.argv[1]))
    layers = pipe.text_encoder.config.num_hidden_layers
    pipe.tokenizer, pipe.text_encoder = components.build_text_encoder()
    pipe.text_encoder.encoder.layer = pipe.text_encoder.encoder.layer[:layers]
    pipe.text_encoder.config.num_hidden_layers = layers
    shutil.rmtree(default_base_dir(), ignore_errors=True)
    print(save_pipeline(pipe, default_base_dir()))
