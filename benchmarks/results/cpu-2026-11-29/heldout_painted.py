"""One-off (2026-11-29), kept as run: the same check as
heldout_nsa.py on painted defects (runtime.synthetic painters, kinds cycling; 80 train/good
images after a seeded shuffle, the 1-shot image left out): a generator the bridge never trained on.
Flawed, kept as run: leaving out each checkpoint's own 1-shot image shifts the defect kinds of the
images after it, so checkpoints are scored on different sets (bridge_seed_rules.md, correction).

    python heldout_painted.py DATA_ROOT BRIDGE.safetensors [...]
"""
import json, sys
import numpy as np, torch
from iadgpt.data import load_split
from iadgpt.models.backbones import get_backbone
from iadgpt.models.bridge import BridgeLM
from iadgpt.models.bridge_train import MAP_KINDS, largest_region_position, load_bridge_parts, load_llm
from iadgpt.models.synth import foreground_mask, guess_kind
from iadgpt.models.train import load_images
from iadgpt.runtime.bridge_runtime import parse_answer
from iadgpt.runtime.facts import POSITION_WORDS
from iadgpt.runtime.synthetic import DEFECT_KINDS, paint_defect

torch.set_num_threads(2)
data, cat = sys.argv[1], "bottle"
bb = get_backbone("efficientnet-lite0")
images = load_images(data, cat, int(bb.input_spec.size[0]))
names = [s.path.name for s in load_split(data, cat, "train")]
kind = guess_kind(images)
llm, encode, decode, eos = load_llm()
order = np.random.default_rng(4321).permutation(len(images)).tolist()
for ck in sys.argv[2:]:
    tge, mmf, maker, meta = load_bridge_parts(ck, bb)
    shot = names.index(meta["shot"])
    painted, truth = [], []
    for j, i in enumerate([i for i in order if i != shot]):
        if len(painted) == 80:
            break
        im, m = paint_defect(images[i], foreground_mask(images[i], kind), DEFECT_KINDS[j % len(DEFECT_KINDS)],
                             np.random.default_rng([4321, i]))
        pos = largest_region_position(m)
        if pos is not None:
            painted.append(im); truth.append(pos)
    feat, masks = maker.images(painted, desc="encoding painted")
    bridge = BridgeLM(llm, encode, decode, tge, mmf, eos).eval()
    res = {}
    for k in MAP_KINDS:
        m = masks[k].float()
        with torch.no_grad():
            cells = mmf.where_logits(m).argmax(-1).tolist()
            pres = mmf.presence_logits(m)
        present = [True] * len(m) if pres is None else (pres > 0).tolist()
        chosen = [POSITION_WORDS[c] if p else None for c, p in zip(cells, present)]
        texts = []
        for i in range(0, len(m), 8):
            texts += bridge.choose(feat[i:i + 8].float(), m[i:i + 8])
        said = [parse_answer(t) for t in texts]
        res[k] = {"yes": float(np.mean([a is True for a, _ in said])),
                  "position": float(np.mean([p == t for (_, p), t in zip(said, truth)])),
                  "locator": float(np.mean([c == t for c, t in zip(chosen, truth)])),
                  "follow": float(np.mean([p == c for (_, p), c in zip(said, chosen)]))}
    print(ck, json.dumps({k: {a: round(100 * b, 1) for a, b in v.items()} for k, v in res.items()}), flush=True)
