"""Diagnostic: per-step clean forget NLL and the adversary's loss for GA vs GA_LAT (seed 0)."""
import json, sys, torch
from pathlib import Path
from mechunlearn.experiments.edit_job import build_context, train_data, chosen_hyperparameters
from mechunlearn.experiments.edit_job import forget_perturbation, with_changes, editing, train
from mechunlearn.localize import Localization
folder = Path(sys.argv[1]); names = sys.argv[2].split(","); out = sys.argv[3]
ctx = build_context(folder)
hm = ctx.hm
data = train_data(ctx.config, ctx.seed_sets[0], ctx.text_train)
prompts = [p for p, _ in data.forget]; answers = [a for _, a in data.forget]
ids = [hm.tokenize(p) for p in prompts]
ans = [hm.tokenize(a, add_special_tokens=False)[0] for a in answers]
from mechunlearn.evals.scoring import last_logits
def clean_nll():
    with torch.no_grad():
        lg = last_logits(ids, hm, 1)[:, -1].float().log_softmax(-1)
    lp = lg[torch.arange(len(ans)), torch.tensor(ans)]
    acc = (lg.argmax(-1) == torch.tensor(ans)).float().mean()
    return float(-lp.mean()), float(acc)
res = {}
for name in names:
    spec = next(s for s in ctx.config.localizations if s.name == name)
    loc = Localization.load(folder / "localizations" / f"{name}.json")
    hp = chosen_hyperparameters(folder, ctx.config, name)
    tc = with_changes(spec.train_config(ctx.config.train), lr=hp.lr, forget_coef=hp.forget_coef, seed=0)
    rows = []
    def on_step(i, rec):
        nll, acc = clean_nll()
        rows.append({"step": i, "clean_forget_nll": nll, "clean_top1": acc,
                     **{k: rec.get(k) for k in ("forget", "adv_loss_first", "adv_loss_last")}})
        print(name, rows[-1], flush=True)
    with editing(hm, spec.trainer, loc.selected) as trainable:
        train(hm, trainable, data, tc, progress=False, on_step=on_step,
              forget_perturbation=forget_perturbation(spec))
    res[name] = rows
Path(out).write_text(json.dumps(res, indent=1))
