"""Does the unlearning adversary succeed? Loss trajectories of train_adversary on seed 0's forget
batch, on the base model and on the GA-unlearned model, for a grid of adversary settings."""
import json, sys, itertools, torch
from pathlib import Path
from mechunlearn.experiments.edit_job import build_context, train_data, chosen_hyperparameters
from mechunlearn.experiments.edit_job import forget_perturbation, with_changes, editing, train
from mechunlearn.localize import Localization
from mechunlearn.edit.latent_adversary import LatentAdversaryConfig, train_adversary
from mechunlearn.models.batches import LatBatch
folder = Path(sys.argv[1]); out = sys.argv[2]
ctx = build_context(folder); hm = ctx.hm
data = train_data(ctx.config, ctx.seed_sets[0], ctx.text_train)
rows = data.forget[:16]
p = [hm.tokenize(a) for a, _ in rows]; c = [hm.tokenize(b, add_special_tokens=False) for _, b in rows]
batch = LatBatch(p, c, c, hm.pad_id)
grid = list(itertools.product([[1], [0, 1, 2, 3]], [0.1, 0.5], ["adam", "sgd_sign"], [0.02, 0.05, 0.2]))
def sweep(label):
    res = []
    for layers, eps, opt, lr in grid:
        cfg = LatentAdversaryConfig(layers=layers, epsilon=eps, epsilon_mode="relative",
                                    positions="prompt", steps=16, lr=lr, optimizer=opt,
                                    toward_coef=1.0, away_coef=0.0)
        adv = train_adversary(hm, batch, cfg, seed=0)
        r = {"model": label, "layers": layers, "eps": eps, "opt": opt, "lr": lr,
             "losses": [round(x, 3) for x in adv.losses]}
        print(r, flush=True); res.append(r)
    return res
results = sweep("base")
spec = next(s for s in ctx.config.localizations if s.name == "GA")
loc = Localization.load(folder / "localizations" / "GA.json")
hp = chosen_hyperparameters(folder, ctx.config, "GA")
tc = with_changes(spec.train_config(ctx.config.train), lr=hp.lr, forget_coef=hp.forget_coef, seed=0)
with editing(hm, spec.trainer, loc.selected) as trainable:
    train(hm, trainable, data, tc, progress=False)
    results += sweep("GA")
Path(out).write_text(json.dumps(results, indent=1))
