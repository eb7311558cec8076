"""One-off (2026-11-28/29), kept to reproduce the README's Bridge table: does a bridge training
place NSA samples it never saw (a new synthesis seed, 1234, of the train/good images, the 1-shot
image left out) as it places the real test defects? Choice decoding, torch route, per map:
answered Yes, right cell, the locator's cell right, the answer names the locator's cell.

    python heldout_nsa.py DATA_ROOT BRIDGE.safetensors [...]   # DATA_ROOT holds bottle/train/good
"""
import json, sys
import numpy as np, torch
from iadgpt.data import load_split
from iadgpt.models.backbones import get_backbone
from iadgpt.models.bridge import BridgeLM
from iadgpt.models.bridge_train import (MAP_KINDS, BridgeConfig, build_bridge_pool, load_bridge_parts, load_llm)
from iadgpt.models.train import load_images
from iadgpt.runtime.bridge_runtime import parse_answer
from iadgpt.runtime.facts import POSITION_WORDS

torch.set_num_threads(2)
data, cat = sys.argv[1], "bottle"
bb = get_backbone("efficientnet-lite0")
images = load_images(data, cat, int(bb.input_spec.size[0]))
paths = [s.path for s in load_split(data, cat, "train")]
llm, encode, decode, eos = load_llm()
out = {}
for ck in sys.argv[2:]:
    tge, mmf, maker, meta = load_bridge_parts(ck, bb)
    shot = [p.name for p in paths].index(meta["shot"])
    pool = build_bridge_pool(maker, images, BridgeConfig(seed=1234, pool_size=60), exclude=[shot])
    bridge = BridgeLM(llm, encode, decode, tge, mmf, eos).eval()
    n = len(pool) // 2
    idx = list(range(n, 2 * n))  # the NSA samples
    res = {}
    for kind in MAP_KINDS:
        m = pool.masks[kind][idx].float()
        with torch.no_grad():
            cells = mmf.where_logits(m).argmax(-1).tolist()
            pres = mmf.presence_logits(m)
        present = [True] * n if pres is None else (pres > 0).tolist()
        chosen = [POSITION_WORDS[c] if p else None for c, p in zip(cells, present)]
        texts = []
        for i in range(0, n, 8):
            texts += bridge.choose(pool.feature[idx[i:i + 8]].float(), m[i:i + 8])
        said = [parse_answer(t) for t in texts]
        truth = [pool.position[i] for i in idx]
        res[kind] = {"yes": float(np.mean([a is True for a, _ in said])),
                     "position": float(np.mean([p == t for (_, p), t in zip(said, truth)])),
                     "locator": float(np.mean([c == t for c, t in zip(chosen, truth)])),
                     "follow": float(np.mean([p == c for (_, p), c in zip(said, chosen)]))}
    out[ck] = res
    print(ck, json.dumps({k: {a: round(100 * b, 1) for a, b in v.items()} for k, v in res.items()}), flush=True)
